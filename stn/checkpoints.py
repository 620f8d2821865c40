"""Checkpoint files: written atomically, read safely, checked against the model that will use them.

Every read goes through :func:`load_checkpoint`, which uses ``torch.load(weights_only=True)``: a
checkpoint is data (tensors, numbers, strings, containers) and nothing in it is executed. A file that
is missing, truncated, corrupt or holds something else fails with a paragraph naming the file and
the fix instead of an unpickling traceback.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from stn.errors import CorruptInputError, MissingInputError

__all__ = ["AtomicCheckpointIO", "load_checkpoint", "run_info", "check_architecture"]

EXAMPLE = "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, made atomic on local disks.

    The checkpoint is written to ``<path>.tmp`` beside its destination, flushed to disk and renamed
    over it (``os.replace``, atomic within one file system): a run killed while saving leaves the
    previous file, e.g. the last ``last.ckpt``, whole and loadable.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transactional write
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        with partial.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location or "cpu")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dictionary stored in the checkpoint at ``path``, read with ``weights_only=True``.

    The file is memory-mapped, so reading only its small entries (``run_info``) does not read the weights.

    Raises:
        MissingInputError: there is no file at ``path``.
        CorruptInputError: the file is truncated or corrupt, holds objects that are not plain data
            (``weights_only`` refuses them), or is not a Lightning training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"ckpt_path={path} does not exist. Pass a checkpoint of a training run, e.g. {EXAMPLE}, or "
            "ckpt_path=last to resume the latest run of the same command."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, AttributeError, ValueError) as error:
        raise CorruptInputError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "It is truncated, corrupt, or holds objects other than tensors and plain data, which are never "
            f"unpickled here (torch.load(weights_only=True)). Pass another checkpoint, e.g. {EXAMPLE}."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CorruptInputError(
            f"{path} is not a training checkpoint (it holds no state_dict). Pass a checkpoint written by "
            f"scripts/train.py, e.g. {EXAMPLE}."
        )
    return checkpoint


def run_info(ckpt_path: str | Path) -> dict:
    """The ``run`` entry of a training checkpoint: ``{"config": resolved config, "image_size": [H, W]}``."""
    checkpoint = load_checkpoint(ckpt_path)
    if "run" not in checkpoint:
        raise CorruptInputError(
            f"{ckpt_path} holds no run information (config, image size): it was not written by "
            "scripts/train.py. Re-create it with scripts/train.py."
        )
    return checkpoint["run"]


def check_architecture(state_dict: dict[str, torch.Tensor], model: nn.Module, path: str | Path) -> None:
    """Raise a :class:`CorruptInputError` unless ``state_dict`` has exactly ``model``'s parameters and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(state_dict) if expected[key].shape != state_dict[key].shape)
    if not (missing or unexpected or reshaped):
        return
    details = "; ".join(
        f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)) if keys
    )
    raise CorruptInputError(
        f"{path} holds a model of another architecture than the one configured ({details}). Use the settings "
        "of the run that wrote it (its .hydra/config.yaml: same +experiment and model.* overrides), or pass a "
        "checkpoint of this configuration."
    )
