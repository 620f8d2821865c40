"""Lightning callbacks and loggers built from their config entries.

Callbacks and loggers are plain values in the config (``configs/callbacks``, ``configs/logger``): one
entry per object, ``{_target_: class, **kwargs}`` or null, so a researcher adds any Lightning callback
or logger (or their own) from a config file. Hydra builds each here; a mistake is reported with the
entry's name and an example.
"""

from __future__ import annotations

from typing import Callable

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig

from stn.errors import SettingError, user_error

__all__ = ["build_callbacks", "build_logger"]


def build_callbacks(config: DictConfig | None) -> list[Callback]:
    """Lightning callbacks from ``{name: {_target_: class, **kwargs} or null}``; null entries are skipped."""
    return _build_targets(config, "callbacks", Callback, "lightning.pytorch.callbacks.ModelCheckpoint")


def build_logger(config: DictConfig | None, purge_step: int | None = None) -> list[Logger] | bool:
    """Lightning loggers from ``{name: {_target_: class, **kwargs} or null}``; ``False`` when there are none.

    ``purge_step``: the step a resumed run starts from; TensorBoard loggers drop the events the killed
    run wrote from that step on (``SummaryWriter(purge_step=...)``), so replayed steps show once.
    """
    def resume_kwargs(entry: DictConfig) -> dict:
        return {"purge_step": purge_step} if purge_step is not None and _builds(entry, TensorBoardLogger) else {}

    return _build_targets(config, "logger", Logger, "lightning.pytorch.loggers.TensorBoardLogger", resume_kwargs) or False


def _builds(entry: DictConfig, kind: type) -> bool:
    """Whether ``entry._target_`` names a subclass of ``kind`` (``False`` where it names no class)."""
    try:
        target = get_class(entry._target_)
    except Exception:  # a wrong _target_ is reported when it is instantiated
        return False
    return issubclass(target, kind)


def _build_targets(
    config: DictConfig | None, group: str, kind: type, example: str,
    extra_kwargs: Callable[[DictConfig], dict] = lambda entry: {},
) -> list:
    """One object per non-null entry of ``config``, instantiated by Hydra from its ``_target_`` (plus
    ``extra_kwargs(entry)``)."""
    built = []
    for name, entry in (config or {}).items():
        if entry is None:
            continue
        key = f"{group}.{name}"
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise SettingError(
                f"{key} has no _target_. Every entry of {group} names the class it builds, e.g. "
                f"{key}._target_={example}, or is null to switch it off."
            )
        try:
            built_object = instantiate(entry, **extra_kwargs(entry))
        except InstantiationException as error:
            if user_error(error):
                raise
            cause = error.__cause__ or error
            reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
            raise SettingError(
                f"{key} could not be built from _target_={entry._target_} ({reason}). Give the full import "
                f"path of a {kind.__name__} class and only keyword arguments it takes, e.g. {key}._target_={example}, "
                f"or set {key}=null."
            ) from error
        if not isinstance(built_object, kind):
            raise SettingError(
                f"{key}._target_={entry._target_} built a {type(built_object).__name__}, not a Lightning "
                f"{kind.__name__}. Name a {kind.__name__} class, e.g. {example}."
            )
        built.append(built_object)
    return built
