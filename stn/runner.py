"""What the scripts do: train, evaluate and warp from a Hydra config.

With :mod:`stn.builders` (callbacks and loggers from their ``_target_``) the only modules of the package
that know about Hydra/OmegaConf. The trainer's settings are plain values in the config
(``configs/trainer``); what a run leaves behind is written by :mod:`stn.run_summary`.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from stn.builders import build_callbacks, build_logger
from stn.callbacks import StepSeed, RunInfo
from stn.checkpoints import AtomicCheckpointIO, load_checkpoint, run_info
from stn.errors import user_error
from stn.images import image_files, load_image
from stn.data.mnist import TensorPairs
from stn.module import STNClassifier
from stn.pose_weights import with_pose_weights
from stn.precision import AUTO, cpu_name, native_bfloat16, resolve_backbone_dtype
from stn.pretraining import pose_pretext
from stn.run_folders import LAST, register_resolvers, resume_point
from stn.run_summary import scalars, write_summary

__all__ = ["train", "evaluate", "warp", "training_split"]

log = logging.getLogger(__name__)

register_resolvers()


def _resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


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
    precision = _resolve_precision(cfg)
    datamodule = instantiate(cfg.data)
    model_config = _with_pose_weights(cfg)  # before seeding: pretraining seeds itself
    seed = L.seed_everything(cfg.seed, workers=True)
    callbacks = [*build_callbacks(cfg.get("callbacks")), RunInfo(_resolved(cfg)), StepSeed(seed)]
    model: STNClassifier = instantiate(model_config)
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path and cfg.train else None
    if checkpoint is not None:
        model.check_checkpoint(checkpoint, ckpt_path)
    logger = build_logger(cfg.get("logger"), checkpoint["global_step"] if checkpoint else None)
    trainer = L.Trainer(**cfg.trainer, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()])
    metrics: dict[str, float] = {}
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(scalars(trainer, "val/"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last = _last_checkpoint(trainer)  # before testing: restoring the best checkpoint resets the callback's record
    if cfg.test:
        ckpt = best or (None if cfg.train else ckpt_path)
        if cfg.train and not best:
            log.warning("No best checkpoint was saved (checkpointing off?): testing the final weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update(scalars(trainer, "test/"))
    extra = {
        "pretrained": model.pretrained,
        "best_checkpoint": best or None,
        "last_checkpoint": last,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "precision": precision,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return write_summary(trainer, _resolved(cfg), cfg.paths.output_dir, metrics, extra)


def _run_device(accelerator: str) -> torch.device:
    """The device a Trainer with ``trainer.accelerator=accelerator`` trains on (``auto``: a GPU when there is one)."""
    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _resolve_precision(cfg: DictConfig) -> dict:
    """Replace every ``backbone_dtype: auto`` of ``cfg`` by the dtype it means on this machine: the loc-nets' for
    the run's device, the pose pretext's for the CPU (where it runs); log it and return the record that
    ``metrics.json`` keeps (the resolved config reaches it and the HPARAMS tab too, and the pose file's name)."""
    device = _run_device(cfg.trainer.accelerator)
    loc_nets = [entry for entry in [cfg.model.get("loc_net"), *(cfg.model.get("stage_loc_nets") or [])]
                if entry is not None and entry.get("backbone_dtype") == AUTO]
    for entry in loc_nets:
        entry.backbone_dtype = resolve_backbone_dtype(AUTO, device)
    if cfg.get("pose_pretraining") is not None:
        cfg.pose_pretraining.backbone_dtype = resolve_backbone_dtype(cfg.pose_pretraining.backbone_dtype, "cpu")
    record = {
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bfloat16": native_bfloat16(device.type),
        "loc_net_backbone_dtype": cfg.model.get("loc_net", {}).get("backbone_dtype"),
        "pose_pretraining_backbone_dtype": cfg.get("pose_pretraining", {}).get("backbone_dtype"),
    }
    log.info("Precision on this machine (%s, torch CPU capability %s, native bfloat16 on %s: %s): loc-net backbone %s, "
             "pose pretext backbone %s", record["cpu"], record["cpu_capability"], device, record["native_bfloat16"],
             record["loc_net_backbone_dtype"], record["pose_pretraining_backbone_dtype"])
    return record


def _with_pose_weights(cfg: DictConfig) -> DictConfig:
    """``cfg.model`` with each ``weights: pose`` replaced by its cached pose-pretrained file
    (:mod:`stn.pose_weights`; made from the training digits of ``cfg.data`` when missing)."""
    settings = _resolved(cfg.pose_pretraining)
    if settings["distortion"] is None:
        settings["distortion"] = pose_pretext(cfg.data.distortion)
    model = with_pose_weights(_resolved(cfg.model), settings, cfg.paths.cache_dir, lambda: training_split(cfg.data).images)
    return OmegaConf.create(model)


def training_split(data: DictConfig) -> TensorPairs:
    """The undistorted training digits and labels of the data config ``data`` (the validation split of its
    ``eval_seed`` and the test set left out): what offline pretraining may read."""
    datamodule = instantiate(data, distortion="none")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.train_set


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
    config = {**run["config"], **resolved}
    return write_summary(trainer, config, cfg.paths.output_dir, scalars(trainer, "test/"), extra)


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
