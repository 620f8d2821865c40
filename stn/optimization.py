"""Optimisers and learning-rate schedules from ``_target_`` settings (``configs/model/optimizer/``,
``configs/model/scheduler/``), the lightning-hydra-template way.

``model.optimizer`` names any ``torch.optim.Optimizer`` by ``_target_`` with its keyword arguments; the
module calls it with its parameter groups. ``model.scheduler`` names any ``torch.optim.lr_scheduler``
class (or is ``None``); it is stepped every training step and gets the run's length as ``total_steps``
or ``T_max`` and each group's learning rate as ``max_lr`` where it takes them and the settings leave
them out. The settings stay plain data (strings and numbers), so a checkpoint keeps them as they were
written and loads with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import torch
from hydra.utils import get_class

from stn.errors import SettingError

__all__ = ["DEFAULT_OPTIMIZER", "check_optimization", "build_optimizer", "build_scheduler"]

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
HYDRA_KEYS = ("_target_", "_partial_")
RUN_LENGTH = ("total_steps", "T_max")  # OneCycleLR, CosineAnnealingLR: the number of training steps


def check_optimization(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any] | None) -> None:
    """A one-paragraph :class:`SettingError` unless ``optimizer`` names a torch optimiser with a positive
    ``lr`` and keys it takes, and ``scheduler`` is ``None`` or names a torch scheduler with keys it takes."""
    _target_class(optimizer, "model.optimizer", torch.optim.Optimizer,
                  "torch.optim.AdamW or torch.optim.SGD (model/optimizer=adamw, adam or sgd)")
    lr = optimizer.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise SettingError(f"model.optimizer.lr must be a positive number, got {lr!r}.")
    if scheduler is not None:
        _target_class(scheduler, "model.scheduler", torch.optim.lr_scheduler.LRScheduler,
                      "torch.optim.lr_scheduler.OneCycleLR (model/scheduler=onecycle or cosine; "
                      "model.scheduler=null for a constant rate)")


def build_optimizer(config: Mapping[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimiser ``config`` names, over parameter ``groups`` (each with its own ``lr``)."""
    arguments = {key: value for key, value in _arguments(config).items() if key != "lr"}
    return get_class(config["_target_"])(groups, **arguments)


def build_scheduler(
    config: Mapping[str, Any], optimizer: torch.optim.Optimizer, total_steps: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler ``config`` names over ``optimizer`` for a run of ``total_steps`` steps."""
    cls = get_class(config["_target_"])
    arguments = _arguments(config)
    takes = inspect.signature(cls).parameters
    run = {name: total_steps for name in RUN_LENGTH if name in takes}
    if "max_lr" in takes:
        run["max_lr"] = [group["lr"] for group in optimizer.param_groups]
    if issubclass(cls, torch.optim.lr_scheduler.OneCycleLR):
        pct_start = arguments.get("pct_start", 0.3)  # torch's default
        steps = arguments.get("total_steps", total_steps)
        if pct_start * steps == 1:  # torch's OneCycleLR divides by (warm-up steps - 1)
            raise SettingError(
                f"The one-cycle warm-up is exactly one step (model.scheduler.pct_start = {pct_start} of {steps} "
                "training steps), which torch's OneCycleLR cannot schedule; change model.scheduler.pct_start or "
                "the number of steps, or set model.scheduler=null."
            )
    return cls(optimizer, **{**run, **arguments})


def _arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``config``: everything but Hydra's keys."""
    return {key: value for key, value in config.items() if key not in HYDRA_KEYS}


def _target_class(config: Any, setting: str, base: type, example: str) -> type:
    """The class ``config["_target_"]`` names; a one-paragraph error unless it is a subclass of ``base``
    taking every other key of ``config``."""
    target = config.get("_target_") if isinstance(config, Mapping) else None
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except (ImportError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise SettingError(
            f"{setting} must name a {base.__module__}.{base.__name__} class by its import path in _target_, got "
            f"{target!r} (from {dict(config) if isinstance(config, Mapping) else config!r}). Set "
            f"{setting}._target_ to one, e.g. {example}."
        )
    takes = inspect.signature(cls).parameters
    unknown = sorted(key for key in _arguments(config) if key not in takes)
    if unknown:
        raise SettingError(
            f"{setting} holds {', '.join(unknown)}, which {target} does not take (it takes "
            f"{', '.join(name for name in takes if name not in ('params', 'optimizer'))}). Remove them "
            f"(~{setting}.{unknown[0]}) or choose the class they belong to."
        )
    return cls
