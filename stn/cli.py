"""What the scripts do with a mistake: print its paragraph alone and exit non-zero.

A :class:`stn.errors.UserError` (raised directly, or inside Hydra's ``InstantiationException``) is
printed as its one paragraph, without a traceback, and the script exits with status 1; a single
run's fresh folder that holds nothing but Hydra's record of the command is removed, so a typo leaves
nothing behind. ``HYDRA_FULL_ERROR=1`` shows the traceback. Under ``-m`` the job fails as any other
(its ``error.txt`` holds the paragraph) and the sweep goes on. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from stn.errors import user_error

__all__ = ["report_user_errors"]


def report_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra task function (under ``@hydra.main``) as described in the module docstring."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as error:
            mistake = user_error(error)
            if mistake is None or os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
                raise
            hydra = HydraConfig.get()
            _remove_if_untouched(Path(hydra.runtime.output_dir), {".hydra", f"{hydra.job.name}.log", "error.txt"})
            raise SystemExit(f"Error: {mistake}") from None

    return run


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _remove_if_untouched(folder: Path, record: set[str]) -> None:
    """Remove ``folder`` if it holds only ``record``, Hydra's note of this one command (nothing a run made)."""
    hydra_record = folder / ".hydra"
    resumed = hydra_record.is_dir() and any(p.name.startswith("resumed_") for p in hydra_record.iterdir())
    if folder.is_dir() and not resumed and {p.name for p in folder.iterdir()} <= record:
        shutil.rmtree(folder)
        if not any(folder.parent.iterdir()):  # the date folder Hydra made for it
            folder.parent.rmdir()
