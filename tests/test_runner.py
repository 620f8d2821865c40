"""The runner's config-to-object helpers: callbacks and loggers from their ``_target_``."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog

from stn.errors import SettingError
from stn.builders import build_callbacks, build_logger


def test_callbacks_are_built_from_their_target_and_null_entries_are_skipped(tmp_path):
    config = OmegaConf.create({
        "model_checkpoint": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "dirpath": str(tmp_path),
                             "monitor": "val/acc", "mode": "max"},
        "early_stopping": None,
        "lr_monitor": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor", "logging_interval": "step"},
        "swa": {"_target_": "lightning.pytorch.callbacks.StochasticWeightAveraging", "swa_lrs": 1e-3},
    })
    checkpoint, lr_monitor, swa = build_callbacks(config)
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor == "val/acc" and checkpoint.mode == "max"
    assert isinstance(lr_monitor, LearningRateMonitor) and lr_monitor.logging_interval == "step"
    assert isinstance(swa, StochasticWeightAveraging)
    assert build_callbacks(None) == []


def test_loggers_are_built_from_their_target_and_none_means_false(tmp_path):
    (csv,) = build_logger(OmegaConf.create({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path)}}))
    assert isinstance(csv, CSVLogger)
    assert build_logger(None) is False
    assert build_logger(OmegaConf.create({"tensorboard": None})) is False


def test_a_resumed_runs_tensorboard_writer_purges_from_the_resumed_step(tmp_path):
    config = OmegaConf.create({
        "tb": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": str(tmp_path)},
        "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path)},
    })
    def purge_steps(logger: TensorBoardLogger) -> list[int]:
        """Steps of the writer's purge marks (a START session log at a step, read back from its file)."""
        logger.experiment.flush()
        (path,) = Path(logger.log_dir).glob("events.out.tfevents.*")
        events = EventFileLoader(str(path)).Load()
        return [e.step for e in events if e.HasField("session_log") and e.session_log.status == SessionLog.START]

    tensorboard, csv = build_logger(config, purge_step=37)
    assert isinstance(tensorboard, TensorBoardLogger) and isinstance(csv, CSVLogger)
    assert purge_steps(tensorboard) == [37], "TensorBoard drops the killed run's events from step 37 on"
    config.tb.version = "fresh"
    fresh, _ = build_logger(config)
    assert purge_steps(fresh) == []


@pytest.mark.parametrize(("entry", "message"), [
    ({"_target_": "lightning.pytorch.callbacks.NoSuchCallback"}, r"callbacks\.mine could not be built from _target_=lightning\.pytorch\.callbacks\.NoSuchCallback"),
    ({"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "no_such_argument": 1}, r"callbacks\.mine could not be built.*no_such_argument"),
    ({"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "."}, r"built a CSVLogger, not a Lightning Callback"),
    ({"monitor": "val/acc"}, r"callbacks\.mine has no _target_"),
])
def test_a_wrong_callback_entry_is_one_paragraph_naming_it(entry, message):
    with pytest.raises(SettingError, match=message) as error:
        build_callbacks(OmegaConf.create({"mine": entry}))
    assert "\n" not in str(error.value)
