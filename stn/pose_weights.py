"""``model.loc_net.weights=pose``: a loc-net backbone pretrained to read the pose of MNIST training
digits, made once per setting and cached.

Before the model is built, ``scripts/train.py`` replaces the value ``pose`` of ``model.loc_net.weights``
(and of each ``model.stage_loc_nets`` entry) by the path of a file in ``paths.cache_dir``, named by the
backbone, its cut, its view size and a hash of every ``pose_pretraining`` setting. A missing file is
made by :func:`stn.pretraining.pretrain_pose` on the training split of the run's data (never a
validation or test image) and written atomically, so later runs, seeds and sweep jobs load it: the
same weights as ``scripts/pretrain_loc_net.py task=pose`` with those settings writes. The transformer
still learns from the class label alone; only its backbone has learned, offline, to see where a digit
is and how it is turned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stn.errors import SettingError
from stn.localization import view_size
from stn.pretraining import pretrain_pose
from stn.transformer import stage_kinds

__all__ = ["POSE", "pose_weights_file", "with_pose_weights"]

POSE = "pose"

log = logging.getLogger(__name__)


def pose_weights_file(
    backbone: str, feature_node: str, input_size: tuple[int, int], settings: Mapping[str, Any], cache_dir: str | Path
) -> Path:
    """Where the pose-pretrained weights of this backbone, cut and view size are cached.

    Args:
        settings: the ``pose_pretraining`` settings (keyword arguments of
            :func:`~stn.pretraining.pretrain_pose`, plus ``digits``); every one is part of the name.
    """
    key = json.dumps({"backbone": backbone, "feature_node": feature_node, "input_size": list(input_size), **settings},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    height, width = input_size
    return Path(cache_dir) / f"{backbone}_{feature_node}_{height}x{width}_{settings['distortion']}_pose_{digest}.pth"


def _made(path: Path, loc_net: Mapping[str, Any], size: tuple[int, int], settings: Mapping[str, Any],
          train_images: Callable[[], Tensor]) -> Path:
    """``path``, after pretraining the backbone and writing it there if it is not cached yet."""
    if path.is_file():
        log.info("model.loc_net.weights=pose: the cached pose-pretrained backbone %s", path)
        return path
    backbone, node = loc_net["backbone"], loc_net["feature_node"]
    options = {key: value for key, value in settings.items() if key != "digits"}
    images = train_images()
    if settings.get("digits") is not None:
        images = images[: settings["digits"]]
    log.info(
        "model.loc_net.weights=pose: pretraining %s cut at %s on a %dx%d view to read the %s pose of %d training "
        "digits, %d epochs, once: then cached at %s",
        backbone, node, *size, settings["distortion"], images.shape[0], settings["epochs"], path,
    )
    start = time.perf_counter()
    state = pretrain_pose(backbone, node, images, input_size=size, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)
    log.info("pose pretraining took %.0f s: %s", time.perf_counter() - start, path)
    return path


def with_pose_weights(
    model: Mapping[str, Any],
    settings: Mapping[str, Any],
    cache_dir: str | Path,
    train_images: Callable[[], Tensor],
) -> dict[str, Any]:
    """The ``model`` settings with every loc-net's ``weights: pose`` replaced by its cached file.

    Args:
        model: the ``model`` config as plain data (``loc_net`` and ``stage_loc_nets`` are read).
        settings: the ``pose_pretraining`` config.
        cache_dir: where the files are kept (``paths.cache_dir``).
        train_images: returns the ``(N, 1, 28, 28)`` uint8 training digits; called only when a file
            has to be made.

    Returns:
        A copy of ``model`` (unchanged for ``transform: none``, which has no loc-net); where
        ``stage_loc_nets`` is set, each entry names its own file, since its stage may cut or view a
        different backbone.
    """
    model = dict(model)
    if not stage_kinds(model.get("transform", "tps")):
        return model
    loc_net = dict(model.get("loc_net") or {})

    def resolved(entry: Mapping[str, Any]) -> Any:
        if entry.get("weights") != POSE:
            return entry.get("weights")
        if entry.get("feature_node") is None or entry.get("input_size") is None:
            raise SettingError(
                f"model.loc_net.weights=pose pretrains the {entry['backbone']} backbone cut at "
                f"model.loc_net.feature_node on a view of model.loc_net.input_size (now {entry.get('feature_node')} and "
                f"{entry.get('input_size')}). Set both to what the loc-net reads (e.g. feature_node=stage2 input_size=32 "
                "for shufflenet_v2_x0_5, layer2 and 42 for resnet18), or choose other weights (DEFAULT, a .pth path, null)."
            )
        size = view_size(entry["input_size"])
        path = pose_weights_file(entry["backbone"], entry["feature_node"], size, settings, cache_dir)
        return str(_made(path, entry, size, settings, train_images))

    if model.get("stage_loc_nets"):
        model["stage_loc_nets"] = [
            {**(stage or {}), "weights": resolved({**loc_net, **(stage or {})})} for stage in model["stage_loc_nets"]
        ]
    if loc_net:
        model["loc_net"] = {**loc_net, "weights": resolved(loc_net)}
    return model
