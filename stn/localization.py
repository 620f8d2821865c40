"""Localization network: a torchvision backbone plus a small head that predicts transform parameters.

The network sees the image in ``[0, 1]``; it repeats one channel to three, optionally resizes the
image to its own view size, normalises with the mean/std of its weights (ImageNet when the weights
carry none), runs the backbone with its classifier head removed, and maps the features through a
small head to the transform parameters.

By default the head reads the backbone's pooled features. Global pooling discards where things
are, which a localization network needs; ``feature_node`` instead cuts the backbone at an inner
node (torchvision feature-extraction names, e.g. ``layer2`` of a resnet) and the head reads the
flattened feature map, position included. It also makes the backbone much cheaper. The head starts at the identity transform: its last layer
has zero weights and its bias holds the identity parameters (their ``atanh`` when bounded), so an
untrained network predicts exactly ``initial`` for every image. ``backbone_dtype`` runs the backbone
alone under bfloat16 (or float16) autocast, the head reading its features in float32: a frozen backbone
that only reads costs a fraction of its float32 time where the hardware computes bfloat16 natively.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from stn.errors import MissingInputError, SettingError
from stn.precision import check_backbone_dtype, resolve_backbone_dtype

__all__ = [
    "LocalizationNet", "backbone_features", "build_backbone", "feature_size",
    "head_name", "loc_net_view", "random_backbones_replaced", "view_size",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_NAMES = ("fc", "classifier", "heads", "head")
PROBE_SIZE = 224


def _backbone_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_backbone_name(name: str) -> None:
    names = _backbone_names()
    if name not in names:
        raise SettingError(
            f"Unknown backbone {name!r} for the localization network. Set model.loc_net.backbone to "
            f"one of torchvision's classification models: {', '.join(names)}."
        )


def head_name(model: nn.Module, backbone: str) -> str:
    """The attribute holding ``model``'s classifier head (one of :data:`HEAD_NAMES`)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise SettingError(
        f"Cannot find the classifier head of backbone {backbone!r}: it has none of the attributes "
        f"{HEAD_NAMES}. Choose another model.loc_net.backbone (e.g. resnet18)."
    )


def _hub_checkpoint_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _enum_weights(backbone: str, name: str) -> torchvision.models.WeightsEnum:
    if name == "pose":
        raise SettingError(
            "weights='pose' names a backbone pretrained on MNIST poses, which scripts/train.py makes (or finds "
            "in paths.cache_dir) before it builds the model (stn.pose_weights.with_pose_weights). Building a "
            "LocalizationNet directly, pass that file's path, e.g. the one scripts/pretrain_loc_net.py task=pose "
            "writes, or DEFAULT or None."
        )
    enum = torchvision.models.get_model_weights(backbone)
    choices = ["DEFAULT", *enum.__members__]
    if name not in choices:
        raise SettingError(
            f"Unknown weights {name!r} for backbone {backbone!r}. Set model.loc_net.weights to one of "
            f"{', '.join(dict.fromkeys(choices))}, a path to a local .pth state_dict, or null for random "
            "initialisation."
        )
    return enum[name]


def _is_path(weights: str) -> bool:
    return weights.endswith((".pth", ".pt")) or os.sep in weights or Path(weights).is_file()


def _load_state_dict(model: nn.Module, state: dict[str, Tensor], head: str, source: str) -> None:
    """Load ``state`` into ``model`` (whose head is already removed), ignoring the file's head keys."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    body = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if missing or unexpected:
        raise SettingError(
            f"The weights from {source} do not fit this backbone: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}. Pass a state_dict saved from the same torchvision "
            "model as model.loc_net.backbone (torch.save(model.state_dict(), path))."
        )


class NodeOutput(nn.Module):
    """A backbone cut at ``node``: returns that node's output ``(N, C, h, w)``."""

    def __init__(self, model: nn.Module, node: str, backbone: str):
        super().__init__()
        nodes = get_graph_node_names(model)[1]
        if node not in nodes and not any(name.startswith(f"{node}.") for name in nodes):
            blocks = ", ".join(dict.fromkeys(name.split(".")[0] for name in nodes))
            raise SettingError(
                f"Backbone {backbone!r} has no node {node!r}. Set model.loc_net.feature_node to one of "
                f"its blocks ({blocks}), an inner node listed by torchvision.models.feature_extraction."
                "get_graph_node_names, or null for the pooled features."
            )
        self.node = node
        self.body = create_feature_extractor(model, return_nodes={node: "features"})

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)["features"]


def build_backbone(
    backbone: str, weights: str | None, feature_node: str | None = None
) -> tuple[nn.Module, tuple, tuple, bool]:
    """A torchvision classification model without its head, optionally cut at ``feature_node``.

    Args:
        backbone: a torchvision model name, e.g. ``"resnet18"``.
        weights: ``"DEFAULT"``, an enum name such as ``"IMAGENET1K_V1"``, a path to a local
            ``.pth`` state_dict, or ``None`` for random initialisation.
        feature_node: a feature-extraction node name to cut the backbone at (e.g. ``"layer2"``);
            ``None`` keeps the whole backbone up to its pooled features.

    Returns:
        ``(model, mean, std, pretrained)``: the headless model, the normalisation its weights
        expect, and whether pretrained weights were actually loaded.
    """
    model, mean, std, pretrained = _load_backbone(backbone, weights)
    if feature_node is not None:
        model = NodeOutput(model, feature_node, backbone)
    return model, mean, std, pretrained


def _load_backbone(backbone: str, weights: str | None) -> tuple[nn.Module, tuple, tuple, bool]:
    _check_backbone_name(backbone)
    model = torchvision.models.get_model(backbone, weights=None)
    head = head_name(model, backbone)
    setattr(model, head, nn.Identity())
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights is None:
        return model, mean, std, False
    weights = str(weights)
    if _is_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingInputError(
                f"model.loc_net.weights points to {path}, which does not exist. Give the path of a "
                "state_dict saved with torch.save(model.state_dict(), path), an enum name such as "
                "DEFAULT, or null for random initialisation."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_state_dict(model, state, head, str(path))
        return model, mean, std, True
    enum_weights = _enum_weights(backbone, weights)
    preset = enum_weights.transforms()
    mean, std = tuple(getattr(preset, "mean", mean)), tuple(getattr(preset, "std", std))
    try:
        state = enum_weights.get_state_dict(progress=False, weights_only=True)
    except (OSError, RuntimeError) as error:
        cache = _hub_checkpoint_path(enum_weights.url)
        message = (
            f"PRETRAINED WEIGHTS NOT LOADED: could not get {enum_weights} for backbone {backbone!r} "
            f"({type(error).__name__}: {error}). The localization network uses RANDOM initialisation "
            f"instead, and the run records pretrained=false. To use the pretrained weights, download "
            f"{enum_weights.url} and either set model.loc_net.weights=/path/to/{cache.name} or put "
            f"the file at {cache} (the torch hub cache, {cache.parent}; set TORCH_HOME to move it). "
            "Set model.loc_net.weights=null to ask for random initialisation without this warning."
        )
        warnings.warn(message, stacklevel=2)
        log.warning(message)
        return model, mean, std, False
    _load_state_dict(model, state, head, str(enum_weights))
    return model, mean, std, True


def feature_size(backbone: nn.Module, input_size: tuple[int, int]) -> int:
    """How many features ``backbone`` gives a ``(1, 3, *input_size)`` image once flattened.

    Probed in evaluation mode (no batch-norm statistics updated by the blank probe); the backbone's
    training mode is restored.
    """
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, *input_size))
    backbone.train(was_training)
    return features.flatten(1).shape[1]


class LocalizationNet(nn.Module):
    """Backbone + head predicting transform parameters, initialised to the identity.

    Args:
        initial: identity parameters, any shape ``S`` (e.g. ``(T, 2)`` target points or a
            ``(2, 3)`` affine matrix); the network predicts ``(N, *S)``.
        backbone: torchvision classification model name.
        weights: ``"DEFAULT"``, an enum name, a local ``.pth`` path, or ``None`` (random init).
        feature_node: cut the backbone at this node and read its flattened feature map
            (``None``: the pooled features).
        input_size: ``(H, W)`` the image is resized to before the backbone (``None``: as is).
        freeze_backbone: keep the backbone fixed (no gradients, batch-norm statistics frozen).
        bounded: squash outputs with ``tanh`` into ``(-1, 1)``.
        hidden: width of the head's hidden layer (0: a single linear layer).
        head_norm: layer-normalise the hidden layer before its ReLU, so that about half of its units
            fire on any image however far training moves their weights (a wide flattened feature
            map under Adam otherwise switches most of them off for good).
        lr_mult: learning-rate multiplier of the whole network relative to the base rate.
        backbone_lr_mult: extra learning-rate multiplier of the backbone (on top of ``lr_mult``).
        backbone_dtype: ``"float32"`` runs the backbone in the run's precision; ``"bfloat16"`` or
            ``"float16"`` under autocast in that dtype, its features returned in float32 for the head;
            ``"auto"``: bfloat16 where the device computes it natively, else float32 (:mod:`stn.precision`).
    """

    def __init__(
        self,
        initial: Tensor,
        backbone: str = "resnet18",
        weights: str | None = "DEFAULT",
        feature_node: str | None = None,
        input_size: tuple[int, int] | int | None = None,
        freeze_backbone: bool = False,
        bounded: bool = False,
        hidden: int = 64,
        head_norm: bool = False,
        lr_mult: float = 1.0,
        backbone_lr_mult: float = 1.0,
        backbone_dtype: str = "float32",
    ):
        super().__init__()
        initial = torch.as_tensor(initial, dtype=torch.float32)
        if bounded and not bool((initial.abs() < 1).all()):
            raise SettingError(
                "model.loc_net.bounded=true squashes outputs into (-1, 1), but the identity "
                f"parameters reach {float(initial.abs().max()):.3g}, so the identity cannot be "
                "represented. For TPS set model.tps.margin > 0 (e.g. 0.1); for the affine transform "
                "set model.loc_net.bounded=false."
            )
        if feature_node is not None and input_size is None:
            raise SettingError(
                f"model.loc_net.feature_node={feature_node!r} needs model.loc_net.input_size: the head "
                "reads the flattened feature map, whose size depends on the view size. Set e.g. "
                "model.loc_net.input_size=32."
            )
        self.output_shape = tuple(initial.shape)
        self.input_size = None if input_size is None else view_size(input_size)
        self.freeze_backbone = bool(freeze_backbone)
        self.bounded = bool(bounded)
        self.lr_mult = float(lr_mult)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.backbone_dtype = check_backbone_dtype(backbone_dtype, "model.loc_net.backbone_dtype")
        self.memory_format = torch.contiguous_format  # STNClassifier(channels_last=True) sets channels_last
        self.backbone, mean, std, self.pretrained = build_backbone(backbone, weights, feature_node)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        features = self._feature_size()
        last = nn.Linear(hidden if hidden else features, initial.numel())
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.atanh(initial).flatten() if self.bounded else initial.flatten())
        if hidden:
            norm = [nn.LayerNorm(hidden)] if head_norm else []
            self.head = nn.Sequential(nn.Linear(features, hidden), *norm, nn.ReLU(inplace=True), last)
        else:
            if head_norm:
                raise SettingError(
                    "model.loc_net.head_norm=true normalises the head's hidden layer, and "
                    "model.loc_net.hidden=0 leaves it none. Set model.loc_net.hidden > 0 (e.g. 64) or "
                    "model.loc_net.head_norm=false."
                )
            self.head = last
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            if not self.pretrained:
                log.warning(
                    f"model.loc_net.freeze_backbone=true keeps the {backbone} backbone at its RANDOM initialisation "
                    f"(model.loc_net.weights={weights!r} loaded nothing): only the head learns, on random features, "
                    "and the transformer barely learns the pose (on RTS 0.80 of the angle left, an error near the "
                    "CNN's alone). Set model.loc_net.weights=pose to pretrain it on the run's training digits, or "
                    "model.loc_net.freeze_backbone=false to let it learn."
                )

    def _feature_size(self) -> int:
        return feature_size(self.backbone, self.input_size or (PROBE_SIZE, PROBE_SIZE))

    def train(self, mode: bool = True) -> LocalizationNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> LocalizationNet:
        super().requires_grad_(requires_grad)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        return self

    def features(self, images: Tensor) -> Tensor:
        """Backbone features ``(N, F)`` for images ``(N, C, H, W)`` in ``[0, 1]``, C in {1, 3}."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise SettingError(
                f"The localization network takes images (N, 1 or 3, H, W), got {tuple(images.shape)}."
            )
        view = loc_net_view(images, self.input_size, self.mean, self.std).contiguous(memory_format=self.memory_format)
        return backbone_features(self.backbone, view, self.backbone_dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Transform parameters ``(N, *initial.shape)`` for images ``(N, C, H, W)`` in ``[0, 1]``."""
        params = self.head(self.features(images))
        if self.bounded:
            params = torch.tanh(params)
        return params.view(-1, *self.output_shape)


def backbone_features(backbone: nn.Module, view: Tensor, dtype: str) -> Tensor:
    """The flattened float32 features ``(N, F)`` of ``backbone`` for a normalised ``view`` ``(N, 3, H, W)``, the
    backbone run in ``dtype`` (one of :data:`~stn.precision.BACKBONE_DTYPES`): ``float32`` leaves the run's own
    precision, an outer autocast included, as it is; ``bfloat16`` / ``float16`` autocast on the view's device;
    ``auto`` is bfloat16 where the view's device computes it natively, else float32."""
    dtype = resolve_backbone_dtype(dtype, view.device)
    autocast = nullcontext() if dtype == "float32" else torch.autocast(view.device.type, dtype=getattr(torch, dtype))
    with autocast:
        features = backbone(view)
    return features.flatten(1).float()


@contextmanager
def random_backbones_replaced() -> Iterator[None]:
    """Build loc-nets whose random backbones the caller replaces right after (a checkpoint's trained weights, a
    benchmark's stand-ins for pretrained ones), without the warning that a frozen backbone keeps its random
    initialisation: that warning is for a run that trains it so."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def loc_net_view(images: Tensor, input_size: tuple[int, int] | None, mean: Tensor, std: Tensor) -> Tensor:
    """What a backbone sees of images ``(N, 1 or 3, H, W)`` in ``[0, 1]``: three channels, resized to
    ``input_size`` (``None``: as is), normalised with ``mean`` / ``std`` ``(1, 3, 1, 1)``."""
    if input_size is not None and tuple(images.shape[-2:]) != tuple(input_size):
        images = F.interpolate(images, size=input_size, mode="bilinear", align_corners=False, antialias=True)
    return (images.expand(-1, 3, -1, -1) - mean) / std  # grey: resized once, then repeated


def view_size(size: tuple[int, int] | list[int] | int) -> tuple[int, int]:
    """``model.loc_net.input_size`` as ``(H, W)``; raises for anything but one or two positive ints."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise SettingError(
            f"model.loc_net.input_size must be an int or (H, W) of positive ints, got {size!r}."
        )
    return int(size[0]), int(size[1])
