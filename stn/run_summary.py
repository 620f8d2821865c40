"""What a finished run leaves behind: ``metrics.json`` in its folder and the HPARAMS tab of TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

__all__ = ["scalars", "write_summary"]

log = logging.getLogger(__name__)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _log_hparams(trainer: L.Trainer, config: dict, pretrained: bool, metrics: dict[str, float]) -> None:
    """The HPARAMS tab: the flattened config and ``pretrained`` against the final metrics.

    The metrics are already scalars of the run, so only the hparams summaries are written.
    """
    tensorboard = _tensorboard(trainer)
    if tensorboard is None or not metrics:
        return
    writer = tensorboard.experiment._get_file_writer()
    for summary in hparams({**_flatten(config), "pretrained": pretrained}, metrics):
        writer.add_summary(summary)
    writer.flush()


def write_summary(trainer: L.Trainer, config: dict, run_dir: str, metrics: dict[str, float], extra: dict) -> dict:
    """Write ``metrics.json`` into the run folder and the hyperparameters + metrics to TensorBoard.

    Only the global-zero process writes; under DDP the other ranks return the same summary.
    """
    summary = {"metrics": metrics, "config": config, **extra}
    if not trainer.is_global_zero:
        return summary
    run_dir = Path(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    _log_hparams(trainer, config, extra["pretrained"], metrics)
    log.info("Metrics: %s", json.dumps(metrics))
    print(f"Run folder: {run_dir}")
    return summary


def scalars(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    """The trainer's logged metrics whose name starts with ``prefix`` (``val/``, ``test/``), as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
