"""Train a model: python scripts/train.py +experiment=mnist_tps [key=value ...]

Seeds, builds data + model + trainer from configs/train.yaml, fits, tests the best checkpoint and
writes metrics.json into the run folder (outputs/<date>/<time>/). ckpt_path=<ckpt> resumes a run.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stn.cli import report_user_errors  # noqa: E402
from stn.runner import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    """Returns the metric named by ``optimized_metric`` (for hyperparameter sweepers), if set."""
    summary = train(cfg)
    return summary["metrics"].get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
