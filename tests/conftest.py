"""What several test modules share: where real MNIST is and the settings of a tiny end-to-end run.

Tests marked ``@pytest.mark.mnist`` read real MNIST from ``$STN_DATA_DIR/MNIST/raw`` (CI points it at
``../shared/data``) and are skipped when it is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MNIST_ROOT = os.environ.get("STN_DATA_DIR", "")
HAS_MNIST = bool(MNIST_ROOT) and (Path(MNIST_ROOT) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()

# 3 training batches of 32, 2 validation and 2 test batches, a 16x16 loc-net view, one epoch; the pose
# split at test on 40 digits x 3 draws; model.loc_net.weights=pose pretrained for one epoch on 256 digits.
TINY_RUN = [
    "data.batch_size=32",
    "data.val_size=256",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "model.loc_net.input_size=16",
    "model.num_log_images=4",
    "callbacks.rich_progress_bar=null",
    "callbacks.pose_split.digits=40",
    "callbacks.pose_split.draws=3",
    "pose_pretraining.epochs=1",
    "pose_pretraining.digits=256",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_MNIST:
        return
    skip = pytest.mark.skip(reason="needs real MNIST: set STN_DATA_DIR to a folder holding MNIST/raw/*-ubyte (e.g. ../shared/data)")
    for item in items:
        if "mnist" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_root() -> str:
    """The folder holding ``MNIST/raw`` (``$STN_DATA_DIR``)."""
    return MNIST_ROOT


@pytest.fixture(scope="session")
def tiny_run() -> list[str]:
    """Hydra overrides for a run of seconds: 3 training steps, 2 validation and 2 test batches."""
    return list(TINY_RUN)
