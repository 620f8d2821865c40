"""Warp images with a trained transformer: python scripts/warp.py ckpt_path=<ckpt> input=<file or folder>

Writes <name>_before.png and <name>_after.png per image into the run folder.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stn.cli import report_user_errors  # noqa: E402
from stn.runner import warp  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="warp")
@report_user_errors
def main(cfg: DictConfig) -> None:
    warp(cfg)


if __name__ == "__main__":
    main()
