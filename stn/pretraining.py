"""Pretrain a loc-net backbone offline: a torchvision classifier trained on plain MNIST training digits.

Where ImageNet weights cannot be fetched, a backbone that has already learned what digits look like is
the next best start for a localization network. :func:`pretrain_backbone` trains the whole torchvision
model (its own head replaced by a ``num_classes`` layer) on undistorted training digits, seen exactly as
:class:`~stn.localization.LocalizationNet` sees images (three channels, resized to ``input_size``,
ImageNet-normalised), and returns its ``state_dict``. Saved with ``torch.save``, it loads through
``model.loc_net.weights=/path/to/file.pth`` (the head's keys are ignored there). Only training digits
are used; the caller passes them (``MNISTDataModule.train_set``, which excludes the validation split).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from stn.errors import SettingError
from stn.localization import HEAD_NAMES, IMAGENET_MEAN, IMAGENET_STD, loc_net_view

__all__ = ["pretrain_backbone"]

log = logging.getLogger(__name__)


def _classifier(backbone: str, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)
    if not any(isinstance(getattr(model, name, None), nn.Module) for name in HEAD_NAMES):
        raise SettingError(f"Backbone {backbone!r} has no classifier head ({HEAD_NAMES}); choose e.g. resnet18.")
    return model


def _view(images: Tensor, input_size: tuple[int, int]) -> Tensor:
    """uint8 ``(B, 1, 28, 28)`` -> normalised float ``(B, 3, H, W)``, as the loc-net sees images."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return loc_net_view(images.float().div(255), input_size, mean, std)


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
    steps = epochs * -(-labels.shape[0] // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(labels.shape[0], generator=generator)
        correct = 0
        for start in range(0, labels.shape[0], batch_size):
            index = order[start : start + batch_size]
            logits = model(_view(images[index], input_size))
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[index]).sum())
        log.info("pretraining %s: epoch %d, training accuracy %.4f", backbone, epoch, correct / labels.shape[0])
    return model.state_dict()
