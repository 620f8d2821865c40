"""Reading what ``scripts/train.py`` stored in a checkpoint: the run's config and image size."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["run_info"]


def run_info(ckpt_path: str | Path) -> dict:
    """The ``run`` entry of a training checkpoint: ``{"config": resolved config, "image_size": [H, W]}``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist. Pass a checkpoint of a training run, e.g. "
            "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "run" not in checkpoint:
        raise ValueError(
            f"{ckpt_path} holds no run information (config, image size): it was not written by "
            "scripts/train.py. Re-create it with scripts/train.py."
        )
    return checkpoint["run"]
