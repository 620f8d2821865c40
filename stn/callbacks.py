"""This repo's callbacks: the two every training run needs (the run's record in each checkpoint, and
training steps that replay exactly) and the pose split measured at test.

Framework callbacks (checkpointing, progress bar, early stopping, ...) are Lightning's own classes,
built by Hydra from ``configs/callbacks``; :class:`RunInfo` and :class:`StepSeed` are added by
:func:`stn.runner.train` because ``scripts/eval.py``, ``scripts/warp.py`` and exact resumption depend
on them; :class:`PoseSplit` is an entry of ``configs/callbacks`` like Lightning's own.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from stn.data.distortions import generator_seed
from stn.data.mnist_files import read_split
from stn.errors import SettingError
from stn.pose_split import SPLIT_DISTORTIONS, pose_split

__all__ = ["RunInfo", "StepSeed", "PoseSplit"]

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


class PoseSplit(Callback):
    """At the end of testing, split the pose the transformer leaves into what follows the draw and what is
    each digit's own (:func:`stn.pose_split.pose_split`) and log it as ``test/pose_split/<name>``.

    The first ``digits`` MNIST test digits are distorted ``draws`` times (seeds ``seed``, ``seed + 1``,
    ...) with the data module's distortion. ``test/pose_split/angle_within_left`` is the distortion's
    angle left after the transformer, free of the pose each digit has of its own (handwriting's slant,
    which :mod:`stn.pose`'s ``test/pose/angle_left`` counts against the transformer); ``..._between_left``
    is that pose. Nothing is logged for a model without a transformer or a distortion without a pose
    (``none``). The scalars reach ``metrics.json`` and the HPARAMS tab with the other test metrics.

    Args:
        digits: test digits measured (at least 2).
        draws: distortions of each digit (at least 2).
        seed: the seed of the first draw (the fixed test set uses ``data.eval_seed``'s own streams).
        batch_size: images per forward pass of the transformer.
    """

    def __init__(self, digits: int = 2000, draws: int = 5, seed: int = 1000, batch_size: int = 500):
        if digits < 2 or draws < 2:
            raise SettingError(
                f"callbacks.pose_split has digits={digits}, draws={draws}: the split compares each digit's draws "
                "with each other and the digits with each other, so it needs at least 2 of each. Set e.g. "
                "callbacks.pose_split.digits=2000 callbacks.pose_split.draws=5, or callbacks.pose_split=null."
            )
        self.digits, self.draws, self.seed, self.batch_size = int(digits), int(draws), int(seed), int(batch_size)

    def on_test_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        distortion = getattr(datamodule, "distortion", None)
        transformer = getattr(module, "transformer", None)
        if distortion not in SPLIT_DISTORTIONS or transformer is None or not transformer.stages:
            return
        upright = read_split(datamodule.root, train=False)[0][: self.digits]
        seeds = [self.seed + k for k in range(self.draws)]
        report = pose_split(transformer, upright, distortion, seeds, self.batch_size)
        for name, value in report.items():  # every rank measures the same digits: the mean is the value
            module.log(f"test/pose_split/{name}", value, sync_dist=True)
