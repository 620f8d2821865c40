"""The two callbacks every training run needs: the run's record in each checkpoint, and training
steps that replay exactly.

Framework callbacks (checkpointing, progress bar, early stopping, ...) are Lightning's own classes,
built by Hydra from ``configs/callbacks``; these two are added by :func:`stn.runner.train` because
``scripts/eval.py``, ``scripts/warp.py`` and exact resumption depend on them.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from stn.data.distortions import generator_seed

__all__ = ["RunInfo", "StepSeed"]

STEP_STREAM = 100  # generator_seed tag of the global generators; the data module's streams use 0-4


class RunInfo(Callback):
    """Stores the run's resolved config and image size in every checkpoint (for eval and warp)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["run"] = {"config": self.config, "image_size": list(trainer.datamodule.image_size)}


class StepSeed(Callback):
    """Re-seeds Python's, NumPy's and torch's global generators (CPU and CUDA) before every training
    step from ``(seed, global step, rank)``.

    Dropout and anything else that draws from the global generators then draws the same numbers at a
    step whether the run got there uninterrupted or resumed from a checkpoint, whatever else drew
    from those generators in between (Lightning's data-loader set-up draws from them too, and not at
    the same moment in a fresh and in a resumed epoch). Shuffling and the training distortions have
    their own ``(seed, epoch)`` generators (:mod:`stn.data.mnist`). So a run killed at any moment and
    resumed from ``last.ckpt`` replays the interrupted epoch exactly.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed = generator_seed(STEP_STREAM, self.seed, trainer.global_step, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
