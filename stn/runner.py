"""What the scripts do: train, evaluate and warp from a Hydra config.

The only module of the package that knows about Hydra/OmegaConf. Trainer, callbacks and logger are
plain values in the config (``configs/trainer``, ``configs/callbacks``, ``configs/logger``); callbacks
and loggers are Lightning's classes (or any others) named by ``_target_`` and built by Hydra here.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import save_image

from stn.callbacks import StepSeed, RunInfo
from stn.checkpoints import AtomicCheckpointIO, load_checkpoint, run_info
from stn.errors import SettingError, user_error
from stn.images import image_files, load_image
from stn.module import STNClassifier
from stn.run_folders import LAST, register_resolvers, resume_point

__all__ = ["train", "evaluate", "warp", "build_callbacks", "build_logger"]

log = logging.getLogger(__name__)

register_resolvers()


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

    ``ckpt_path=last`` continues this run folder (:mod:`stn.run_folders`): a finished run is skipped
    (its ``metrics.json`` is returned), an interrupted one resumes from ``checkpoints/last.ckpt``. A
    run that fails leaves ``error.txt`` in the run folder (the traceback, or a mistake's paragraph) so
    a sweep's table can say why, and raises on.
    """
    try:
        return _train(cfg)
    except Exception as error:
        mistake = user_error(error)
        report = f"{type(mistake).__name__}: {mistake}\n" if mistake else traceback.format_exc()
        Path(cfg.paths.output_dir, "error.txt").write_text(report)
        raise


def _start_checkpoint(cfg: DictConfig) -> tuple[str | None, Path | None]:
    """The checkpoint ``fit`` starts from, and ``metrics.json`` when ``ckpt_path=last`` finds the run finished."""
    if cfg.ckpt_path != LAST:
        return cfg.ckpt_path, None
    state, path = resume_point(cfg.paths.output_dir)
    if state == "finished":
        return None, path
    if state == "resume":
        log.info("ckpt_path=last: resuming %s from %s", cfg.paths.output_dir, path)
        return str(path), None
    log.info("ckpt_path=last: no earlier run of this command in %s; starting it", cfg.paths.output_dir)
    return None, None


def _train(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    ckpt_path, finished = _start_checkpoint(cfg)
    if finished:
        print(f"Already finished, skipped: {finished}")
        return json.loads(finished.read_text())
    seed = L.seed_everything(cfg.seed, workers=True)
    callbacks = [*build_callbacks(cfg.get("callbacks")), RunInfo(_resolved(cfg)), StepSeed(seed)]
    datamodule = instantiate(cfg.data)
    model: STNClassifier = instantiate(cfg.model)
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path and cfg.train else None
    if checkpoint is not None:
        model.check_checkpoint(checkpoint, ckpt_path)
    logger = build_logger(cfg.get("logger"), checkpoint["global_step"] if checkpoint else None)
    trainer = L.Trainer(**cfg.trainer, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()])
    metrics: dict[str, float] = {}
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(_scalars(trainer, "val/"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last = _last_checkpoint(trainer)  # before testing: restoring the best checkpoint resets the callback's record
    if cfg.test:
        ckpt = best or (None if cfg.train else ckpt_path)
        if cfg.train and not best:
            log.warning("No best checkpoint was saved (checkpointing off?): testing the final weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update(_scalars(trainer, "test/"))
    extra = {
        "pretrained": model.pretrained,
        "best_checkpoint": best or None,
        "last_checkpoint": last,
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
    resolved = _resolved(cfg)
    model = STNClassifier.from_checkpoint(cfg.ckpt_path, passes=resolved.get("passes"))
    datamodule = instantiate(cfg.data)
    trainer = L.Trainer(**cfg.trainer, callbacks=build_callbacks(cfg.get("callbacks")),
                        logger=build_logger(cfg.get("logger")))
    trainer.test(model, datamodule=datamodule)
    extra = {
        "pretrained": model.pretrained,
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    config = {**run["config"], **resolved}
    config["model"] = {**config.get("model", {}), "passes": model.hparams.passes}
    return _finish(trainer, config, cfg.paths.output_dir, _scalars(trainer, "test/"), extra)


def warp(cfg: DictConfig) -> list[Path]:
    """Write ``<name>_before.png`` / ``<name>_after.png`` for every input image; return the paths."""
    run = run_info(cfg.ckpt_path)
    model = STNClassifier.from_checkpoint(cfg.ckpt_path).eval()
    size = tuple(run["image_size"])
    files = image_files(Path(cfg.input))
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
