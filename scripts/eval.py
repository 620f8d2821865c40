"""Re-test a checkpoint: python scripts/eval.py ckpt_path=<ckpt> [data.distortion=e]

Writes its own run folder with TensorBoard logs and metrics.json.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stn.cli import report_user_errors  # noqa: E402
from stn.runner import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
