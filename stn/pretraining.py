"""Pretrain a loc-net backbone offline on MNIST training digits: to classify them, or to read their pose.

Where ImageNet weights cannot be fetched, a backbone that has already learned what digits look like is
the next best start for a localization network. Two tasks, each seeing images exactly as
:class:`~stn.localization.LocalizationNet` does (three channels, resized to ``input_size``,
ImageNet-normalised), each returning the torchvision model's ``state_dict``, which, saved with
``torch.save``, loads through ``model.loc_net.weights=/path/to/file.pth`` (the head's keys are ignored):

- :func:`pretrain_backbone` trains the whole model (its own head replaced by a ``num_classes`` layer)
  to classify undistorted digits.
- :func:`pretrain_pose` trains the backbone cut at ``feature_node``, with a small head on its flattened
  map, to regress the pose the distortion drew (``r``: the angle; ``rts``: angle, log-scale and shift)
  from freshly distorted digits: a self-supervised pretext task whose labels are the draws themselves.
  The layers after ``feature_node`` keep their initialisation (the loc-net does not use them).

Only training digits are used; the caller passes them (``MNISTDataModule.train_set``, which excludes
the validation split), so neither task sees a validation or test image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from stn.data.distortions import CANVAS_SIZE, INPUT_SIZE, R_MAX_ANGLE, RTS_MAX_ANGLE, RTS_SCALE, sample_params, warp
from stn.errors import SettingError
from stn.localization import IMAGENET_MEAN, IMAGENET_STD, backbone_features, build_backbone, feature_size, head_name, loc_net_view
from stn.precision import check_backbone_dtype, resolve_backbone_dtype
from stn.progress import StepClock

__all__ = ["pose_pretext", "pose_targets", "pretrain_backbone", "pretrain_pose"]

POSE_PARTS = {"r": ("angle",), "rts": ("angle", "log_scale", "shift_x", "shift_y")}

log = logging.getLogger(__name__)


def _classifier(backbone: str, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)
    head_name(model, backbone)  # raises for a model without a classifier head
    return model


def _view(images: Tensor, input_size: tuple[int, int]) -> Tensor:
    """``(B, 1, h, w)`` uint8 in [0, 255] or float in [0, 1] -> normalised float ``(B, 3, H, W)``, as the
    loc-net sees images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return loc_net_view(images if images.is_floating_point() else images.float().div(255), input_size, mean, std)


def _fit(
    parameters: list[nn.Parameter],
    count: int,
    batch_loss: Callable[[Tensor], Tensor],
    report: Callable[[int], str],
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    task: str,
) -> None:
    """Adam with a one-cycle schedule over ``epochs`` shuffled passes of ``count`` examples.

    ``batch_loss`` takes the ``(B,)`` indices of a batch and returns its loss; ``report`` is called
    with the epoch after each pass and returns what the epoch's log line says of it. ``generator``
    shuffles (and may draw whatever ``batch_loss`` draws). ``task`` names the job in the progress lines:
    one with the time it will take, estimated from its first steps on this machine, and one per epoch
    with the time left.
    """
    steps_per_epoch = -(-count // batch_size)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    clock = StepClock(task, epochs * steps_per_epoch, log)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            loss = batch_loss(order[start : start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            clock.step()
        clock.epoch(epoch, epochs, report(epoch))


def pretrain_backbone(
    backbone: str,
    images: Tensor,
    labels: Tensor,
    input_size: tuple[int, int] = (32, 32),
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Train ``backbone`` to classify ``images`` and return its ``state_dict`` (head included).

    Args:
        backbone: a torchvision classification model name.
        images: ``(N, 1, 28, 28)`` uint8 training digits.
        labels: ``(N,)`` int64.
        input_size: the view size, as ``model.loc_net.input_size``.
        epochs, batch_size, lr: Adam with a one-cycle schedule.
        seed: shuffling and initialisation.
    """
    torch.manual_seed(seed)
    model = _classifier(backbone, int(labels.max()) + 1)
    correct: list[int] = []

    def batch_loss(index: Tensor) -> Tensor:
        logits = model(_view(images[index], input_size))
        correct.append(int((logits.argmax(1) == labels[index]).sum()))
        return F.cross_entropy(logits, labels[index])

    def report(epoch: int) -> str:
        accuracy = sum(correct) / labels.shape[0]
        correct.clear()
        return f"training accuracy {accuracy:.4f}"

    model.train()
    generator = torch.Generator().manual_seed(seed)
    _fit(list(model.parameters()), labels.shape[0], batch_loss, report, epochs, batch_size, lr, generator,
         f"pretraining {backbone} to classify digits")
    return model.state_dict()


def _check_pose_distortion(name: str) -> None:
    if name not in POSE_PARTS:
        raise SettingError(
            f"distortion={name!r} has no pose to pretrain on: pose pretraining regresses the angle of r or "
            "the angle, scale and shift of rts. Set distortion=rts (or r), or task=classes."
        )


def pose_pretext(distortion: str) -> str:
    """The pose a loc-net backbone pretrains on for data distorted by ``distortion``: its own where it
    draws one (``r``, ``rts``), else ``rts`` (``p`` and ``e`` draw no angle, scale or shift; ``none`` nothing)."""
    return distortion if distortion in POSE_PARTS else "rts"


def pose_targets(name: str, params: dict[str, Tensor]) -> Tensor:
    """The pose drawn by distortion ``name`` (:func:`~stn.data.distortions.sample_params`), each part
    divided by its largest value so that all lie in [-1, 1].

    Returns:
        ``r``: ``(N, 1)`` angle; ``rts``: ``(N, 4)`` angle, log-scale (centred on the middle of its
        range), shift x and y (canvas pixels over the most a shift can be).
    """
    _check_pose_distortion(name)
    angle = params["angle"]
    if name == "r":
        return (angle / R_MAX_ANGLE)[:, None]
    low, high = math.log(RTS_SCALE[0]), math.log(RTS_SCALE[1])
    log_scale = (params["scale"].log() - (low + high) / 2) / ((high - low) / 2)
    most_shift = (CANVAS_SIZE - INPUT_SIZE * RTS_SCALE[0]) / 2
    return torch.cat([(angle / RTS_MAX_ANGLE)[:, None], log_scale[:, None], params["shift"] / most_shift], dim=1)


def pretrain_pose(
    backbone: str,
    feature_node: str,
    images: Tensor,
    distortion: str = "rts",
    input_size: tuple[int, int] = (32, 32),
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    hidden: int = 64,
    seed: int = 0,
    backbone_dtype: str = "float32",
    channels_last: bool = False,
) -> dict[str, Tensor]:
    """Train ``backbone`` cut at ``feature_node`` to regress the pose of distorted ``images``; return the
    whole torchvision model's ``state_dict`` (the layers after the cut as initialised).

    Args:
        backbone: a torchvision classification model name.
        feature_node: the node the loc-net cuts the backbone at (``model.loc_net.feature_node``).
        images: ``(N, 1, 28, 28)`` uint8 training digits, distorted afresh every batch.
        distortion: ``r`` or ``rts``; the targets are :func:`pose_targets`.
        input_size: the view size, as ``model.loc_net.input_size``.
        epochs, batch_size, lr: Adam with a one-cycle schedule on the mean squared error.
        hidden: width of the regression head's hidden layer (discarded afterwards).
        seed: initialisation, shuffling and the distortion draws.
        backbone_dtype: ``float32``, or ``bfloat16`` / ``float16`` to run the backbone under autocast (mixed
            precision: the weights, the head and the loss stay float32), as ``model.loc_net.backbone_dtype``;
            ``auto``: bfloat16 where this CPU computes it natively, else float32 (the pretext runs on the CPU).
        channels_last: the backbone and its views in channels-last memory format (on a CPU about 1.4x faster
            for resnet18's dense convolutions; the returned weights are contiguous either way).
    """
    _check_pose_distortion(distortion)
    backbone_dtype = resolve_backbone_dtype(check_backbone_dtype(backbone_dtype, "pose_pretraining.backbone_dtype"), "cpu")
    parts = POSE_PARTS[distortion]
    torch.manual_seed(seed)
    full = torchvision.models.get_model(backbone, weights=None)
    cut, _, _, _ = build_backbone(backbone, None, feature_node)
    head = nn.Sequential(nn.Linear(feature_size(cut, input_size), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, len(parts)))
    generator = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    errors: list[Tensor] = []
    spreads: list[Tensor] = []

    def batch_loss(index: Tensor) -> Tensor:
        params = sample_params(distortion, index.shape[0], generator)
        target = pose_targets(distortion, params)
        view = _view(warp(images[index], distortion, params), input_size).contiguous(memory_format=memory_format)
        predicted = head(backbone_features(cut, view, backbone_dtype))
        errors.append((predicted.detach() - target).square().sum(0))
        spreads.append(target.square().sum(0))
        return F.mse_loss(predicted, target)

    def report(epoch: int) -> str:
        left = (torch.stack(errors).sum(0) / torch.stack(spreads).sum(0)).sqrt()
        errors.clear()
        spreads.clear()
        return "rms error / rms pose: " + ", ".join(f"{part} {value:.3f}" for part, value in zip(parts, left.tolist()))

    cut.to(memory_format=memory_format).train()
    _fit([*cut.parameters(), *head.parameters()], images.shape[0], batch_loss, report, epochs, batch_size, lr, generator,
         f"pose pretraining {backbone} at {feature_node} ({backbone_dtype})")
    body = cut.body.state_dict() if hasattr(cut, "body") else cut.state_dict()
    full_head = head_name(full, backbone)
    unexpected = full.load_state_dict(body, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the cut backbone's keys do not fit {backbone}: {unexpected[:5]}")
    return {key: value for key, value in full.state_dict().items() if not key.startswith(f"{full_head}.")}
