"""The runner's config-to-object helpers: callbacks and loggers by name."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import OmegaConf

from stn.runner import CALLBACKS, LOGGERS, build_callbacks, build_logger


def test_callbacks_are_built_by_name_and_null_entries_are_skipped(tmp_path):
    config = OmegaConf.create({
        "model_checkpoint": {"dirpath": str(tmp_path), "monitor": "val/acc", "mode": "max"},
        "early_stopping": None,
        "lr_monitor": {"logging_interval": "step"},
    })
    checkpoint, lr_monitor = build_callbacks(config)
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor == "val/acc" and checkpoint.mode == "max"
    assert isinstance(lr_monitor, LearningRateMonitor) and lr_monitor.logging_interval == "step"
    assert build_callbacks(None) == []


def test_no_logger_means_false():
    assert build_logger(None) is False
    assert build_logger(OmegaConf.create({"tensorboard": None})) is False


@pytest.mark.parametrize(("build", "group", "known"), [(build_callbacks, "callbacks", CALLBACKS), (build_logger, "logger", LOGGERS)])
def test_unknown_names_list_the_known_ones(build, group, known):
    with pytest.raises(ValueError, match=f"'wandb' in {group}") as error:
        build(OmegaConf.create({"wandb": {}}))
    assert all(name in str(error.value) for name in known)
