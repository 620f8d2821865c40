"""Catching a diverged training run without waiting on the device every step.

:class:`LossWatch` keeps the first non-finite training loss (its value, epoch and step) in a tensor on
the loss's own device: recording a step launches a few small kernels and never copies to the host, so a
GPU runs on. :meth:`LossWatch.first` reads the record back (one device sync); the module calls it where
the device is synchronised anyway (at the logger's cadence and before a checkpoint is written), so a
diverged run stops within ``trainer.log_every_n_steps`` steps and never saves diverged weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stn.errors import DivergedError

__all__ = ["LossWatch", "diverged_error"]


class LossWatch:
    """The first non-finite loss seen, as ``(loss, epoch, step)``, kept on the loss's device."""

    def __init__(self) -> None:
        self._first: Tensor | None = None  # (3,): loss, epoch, step; step -1 while every loss was finite

    def record(self, loss: Tensor, epoch: int, step: int) -> None:
        """Keep ``loss`` (a scalar) with its ``epoch`` and ``step`` if it is the first non-finite one."""
        loss = loss.detach().float()
        if self._first is None or self._first.device != loss.device:
            self._first = torch.full((3,), -1.0, device=loss.device)
        here = torch.stack([loss, torch.full_like(loss, epoch), torch.full_like(loss, step)])
        first_bad = ~torch.isfinite(loss) & (self._first[2] < 0)
        self._first = torch.where(first_bad, here, self._first)

    def first(self) -> tuple[float, int, int] | None:
        """``(loss, epoch, step)`` of the first non-finite loss recorded, or ``None`` (syncs the device)."""
        if self._first is None:
            return None
        loss, epoch, step = self._first.tolist()
        return None if step < 0 else (loss, int(epoch), int(step))


def diverged_error(
    loss: float, epoch: int, step: int, lr: float, lr_mults: Sequence[float], checkpoint: str
) -> DivergedError:
    """The one-paragraph error for a loss that became ``loss`` at ``epoch``/``step``: the usual cause and
    the settings that fix it (``lr_mults``: each stage's loc-net ``lr_mult``, empty without a transformer),
    and where to resume (``checkpoint``: the last one saved before it, or ``""``)."""
    if lr_mults:
        if len(set(lr_mults)) == 1:
            rates = f"model.loc_net.lr_mult (now {lr_mults[0]})"
        else:
            now = ", ".join(f"stage {k} {mult}" for k, mult in enumerate(lr_mults, start=1))
            rates = f"the loc-nets' lr_mult (model.loc_net.lr_mult or model.stage_loc_nets[k].lr_mult; now {now})"
        cause = (
            "The usual cause is a localization network that moves too fast: its predicted transform runs "
            "off the image, the sampling grid folds and the classifier diverges (the loc/stage<k>/param_std "
            f"curves in TensorBoard rise steeply before it). Lower {rates} or "
            f"model.optimizer.lr (now {lr}), keep a hidden layer in the loc-net head (model.loc_net.hidden > 0), "
            "set trainer.gradient_clip_val (e.g. 1.0), set model.loc_net.bounded=true (with model.tps.margin > 0), "
            "or add model.bending_weight > 0."
        )
    else:
        cause = (f"The usual cause is a learning rate too high for this model: lower model.optimizer.lr (now {lr}) "
                 "or set trainer.gradient_clip_val (e.g. 1.0).")
    cause += " A non-finite input image gives the same (check a data module of your own with torch.isfinite)."
    if checkpoint:
        resume = f"The last good checkpoint is {checkpoint} (nothing after it was saved); resume with ckpt_path={checkpoint}."
    else:
        resume = "No checkpoint was saved before it."
    return DivergedError(f"The training loss is {loss} at epoch {epoch}, step {step}. {cause} {resume}")
