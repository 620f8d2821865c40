"""Pretrain a loc-net backbone on MNIST training digits: python scripts/pretrain_loc_net.py [task=pose ...]

task=classes (default) classifies undistorted digits and writes <run folder>/<backbone>_mnist.pth;
task=pose regresses the pose of freshly distorted digits (stn.pretraining.pretrain_pose) and writes
<run folder>/<backbone>_<feature_node>_<distortion>_pose.pth. Use the file as model.loc_net.weights=<path>.
Only the training split is read (the validation split of data.eval_seed and the test set are not).
model.loc_net.weights=pose makes the task=pose file inside a training run instead, cached (stn.pose_weights).
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stn.cli import report_user_errors  # noqa: E402
from stn.errors import SettingError  # noqa: E402
from stn.pretraining import pretrain_backbone, pretrain_pose  # noqa: E402
from stn.runner import register_resolvers, training_split  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain_loc_net")
@report_user_errors
def main(cfg: DictConfig) -> None:
    if cfg.task not in ("classes", "pose"):
        raise SettingError(f"task={cfg.task!r} is not a pretraining task: set task=classes or task=pose.")
    train = training_split(cfg.data)
    size = (cfg.input_size, cfg.input_size)
    if cfg.task == "classes":
        state = pretrain_backbone(cfg.backbone, train.images, train.labels, size, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed)
        name = f"{cfg.backbone}_mnist.pth"
    else:
        state = pretrain_pose(cfg.backbone, cfg.feature_node, train.images, cfg.distortion, size, cfg.epochs,
                              cfg.batch_size, cfg.lr, cfg.hidden, cfg.seed, cfg.backbone_dtype,
                              cfg.channels_last)
        name = f"{cfg.backbone}_{cfg.feature_node}_{cfg.distortion}_pose.pth"
    path = Path(cfg.paths.output_dir) / name
    torch.save(state, path)
    print(f"Backbone weights: {path}")
    print(f"Use them with: python scripts/train.py +experiment=mnist_tps model.loc_net.backbone={cfg.backbone} "
          f"model.loc_net.feature_node={cfg.feature_node} model.loc_net.input_size={cfg.input_size} "
          f"model.loc_net.weights={path}")
    print(f"Run folder: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
