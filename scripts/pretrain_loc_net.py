"""Pretrain a loc-net backbone on plain MNIST: python scripts/pretrain_loc_net.py [backbone=...]

Writes <run folder>/<backbone>_mnist.pth and prints its path; use it as model.loc_net.weights=<path>.
Only the training split is read (the validation split of data.eval_seed and the test set are not).
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stn.cli import report_user_errors  # noqa: E402
from stn.pretraining import pretrain_backbone  # noqa: E402
from stn.runner import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_loc_net")
@report_user_errors
def main(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data, distortion="none")
    datamodule.prepare_data()
    datamodule.setup("fit")
    train = datamodule.train_set
    size = (cfg.input_size, cfg.input_size)
    state = pretrain_backbone(cfg.backbone, train.images, train.labels, size, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed)
    path = Path(cfg.paths.output_dir) / f"{cfg.backbone}_mnist.pth"
    torch.save(state, path)
    print(f"Backbone weights: {path}")
    print(f"Use them with: python scripts/train.py +experiment=mnist_tps model.loc_net.weights={path}")
    print(f"Run folder: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
