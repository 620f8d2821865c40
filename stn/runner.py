"""What the scripts do: train, evaluate and warp from a Hydra config.

The only module of the package that knows about Hydra/OmegaConf. Trainer, callbacks and logger are
plain values in the config (``configs/trainer``, ``configs/callbacks``, ``configs/logger``) and are
built here; every ``_target_`` in the configs names a class of ``stn``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    RichModelSummary,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import save_image

from stn.checkpoints import run_info
from stn.module import STNClassifier

__all__ = ["train", "evaluate", "warp", "build_callbacks", "build_logger"]

log = logging.getLogger(__name__)

CALLBACKS = {
    "model_checkpoint": ModelCheckpoint,
    "early_stopping": EarlyStopping,
    "lr_monitor": LearningRateMonitor,
    "rich_progress_bar": RichProgressBar,
    "rich_model_summary": RichModelSummary,
}
LOGGERS = {"tensorboard": TensorBoardLogger, "csv": CSVLogger}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def job_folder_name(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from Hydra's ``override_dirname`` that stays a legal file name.

    Short lists stay as they are (``model.tps.rows=3,seed=2``). Longer ones keep only the last part
    of every key (``rows=3,seed=2``) and, if still too long, are cut with a hash of the whole list;
    the job number in front keeps names unique and ``.hydra/overrides.yaml`` holds the full list.
    """
    if len(overrides) <= limit:
        return overrides
    short = ",".join(_last_key_part(item) for item in overrides.split(","))
    if len(short) <= limit:
        return short
    return short[: limit - 9] + "~" + hashlib.sha1(overrides.encode()).hexdigest()[:8]


def _last_key_part(item: str) -> str:
    """``model.tps.rows=3`` -> ``rows=3``."""
    key, separator, value = item.partition("=")
    return key.rsplit(".", 1)[-1] + separator + value


def register_resolvers() -> None:
    """``${job_folder_name:...}`` for configs/hydra (sweep job folders); safe to call again."""
    OmegaConf.register_new_resolver("job_folder_name", job_folder_name, replace=True)


register_resolvers()


def build_callbacks(config: DictConfig | None) -> list[Callback]:
    """Lightning callbacks from ``{name: keyword arguments or null}``; see :data:`CALLBACKS`."""
    return _build_named(config, CALLBACKS, "callback", "callbacks")


def build_logger(config: DictConfig | None) -> list[Logger] | bool:
    """Lightning loggers from ``{name: keyword arguments or null}``; ``False`` when there are none."""
    return _build_named(config, LOGGERS, "logger", "logger") or False


def _build_named(config: DictConfig | None, known: dict[str, type], kind: str, group: str) -> list:
    """One object per non-null entry of ``config``, built from ``known[name](**kwargs)``."""
    built = []
    for name, kwargs in (config or {}).items():
        if kwargs is None:
            continue
        if name not in known:
            raise ValueError(f"Unknown {kind} {name!r} in {group}. Known {kind}s: {', '.join(known)}.")
        built.append(known[name](**OmegaConf.to_container(kwargs, resolve=True)))
    return built


class RunInfo(Callback):
    """Stores the run's resolved config and image size in every checkpoint (for eval and warp)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["run"] = {"config": self.config, "image_size": list(trainer.datamodule.image_size)}


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


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


def _finish(trainer: L.Trainer, config: dict, run_dir: str, metrics: dict[str, float], extra: dict) -> dict:
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


def _scalars(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def train(cfg: DictConfig) -> dict:
    """Seed, build, fit, test the best checkpoint; write ``metrics.json``. Returns its content.

    A run that fails leaves its traceback in ``error.txt`` in the run folder (so a sweep's table
    can say why) and raises on.
    """
    try:
        return _train(cfg)
    except Exception:
        Path(cfg.paths.output_dir, "error.txt").write_text(traceback.format_exc())
        raise


def _train(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model: STNClassifier = instantiate(cfg.model)
    callbacks = [*build_callbacks(cfg.get("callbacks")), RunInfo(_resolved(cfg))]
    trainer = L.Trainer(**cfg.trainer, callbacks=callbacks, logger=build_logger(cfg.get("logger")))
    metrics: dict[str, float] = {}
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        metrics.update(_scalars(trainer, "val/"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.test:
        ckpt = best or (None if cfg.train else cfg.ckpt_path)
        if cfg.train and not best:
            log.warning("No best checkpoint was saved (checkpointing off?): testing the final weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update(_scalars(trainer, "test/"))
    extra = {
        "pretrained": model.pretrained,
        "best_checkpoint": best or None,
        "last_checkpoint": _last_checkpoint(trainer),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return _finish(trainer, _resolved(cfg), cfg.paths.output_dir, metrics, extra)


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return (callback.last_model_path or None) if callback else None


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint on ``cfg.data`` (its training distortion and eval seed unless overridden).

    The ``config`` of ``metrics.json`` is the training config (model, seed, ...) with this run's
    keys (data, trainer, paths, ckpt_path, ...) on top.
    """
    start = time.perf_counter()
    run = run_info(cfg.ckpt_path)
    for key in ("distortion", "eval_seed"):
        if cfg.data[key] is None:
            cfg.data[key] = run["config"]["data"][key]
    model = STNClassifier.from_checkpoint(cfg.ckpt_path)
    datamodule = instantiate(cfg.data)
    trainer = L.Trainer(**cfg.trainer, callbacks=build_callbacks(cfg.get("callbacks")),
                        logger=build_logger(cfg.get("logger")))
    trainer.test(model, datamodule=datamodule)
    extra = {
        "pretrained": model.pretrained,
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    config = {**run["config"], **_resolved(cfg)}
    return _finish(trainer, config, cfg.paths.output_dir, _scalars(trainer, "test/"), extra)


def _image_files(source: Path) -> list[Path]:
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not files or not all(p.is_file() for p in files):
        raise FileNotFoundError(
            f"input={source} is neither an image file nor a folder holding {', '.join(IMAGE_SUFFIXES)} "
            "files. Pass input=<image file or folder>."
        )
    return files


def load_image(path: Path, channels: int, size: tuple[int, int], invert: bool = False) -> torch.Tensor:
    """An image file as the model sees it: float ``(channels, H, W)`` in [0, 1] at ``size``."""
    with Image.open(path) as file:
        image = pil_to_tensor(file.convert("L" if channels == 1 else "RGB")).float() / 255
    if invert:
        image = 1 - image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def warp(cfg: DictConfig) -> list[Path]:
    """Write ``<name>_before.png`` / ``<name>_after.png`` for every input image; return the paths."""
    run = run_info(cfg.ckpt_path)
    model = STNClassifier.from_checkpoint(cfg.ckpt_path).eval()
    size = tuple(run["image_size"])
    files = _image_files(Path(cfg.input))
    images = torch.stack([load_image(p, model.hparams.in_channels, size, cfg.invert) for p in files])
    with torch.no_grad():
        warped = model.transformer(images)
        predictions = model.classify(warped).argmax(1).tolist()
    out_dir = Path(cfg.paths.output_dir)
    written = []
    for path, before, after, label in zip(files, images, warped, predictions):
        for name, image in ((f"{path.stem}_before.png", before), (f"{path.stem}_after.png", after)):
            save_image(image.clamp(0, 1), out_dir / name)
            written.append(out_dir / name)
        print(f"{path}: predicted class {label}")
    print(f"Run folder: {out_dir}")
    return written
