"""Before/after figure of a trained transformer: python scripts/figure.py ckpt_path=<ckpt> [output=<png>]

Rows: the upright test digits, the distorted inputs with the sampling mesh, the transformer's output.
The test images are the checkpoint's own fixed test set (its distortion and eval seed).
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from stn.checkpoints import run_info  # noqa: E402
from stn.cli import report_user_errors  # noqa: E402
from stn.data import MNISTDataModule  # noqa: E402
from stn.data.mnist_files import read_split  # noqa: E402
from stn.figures import before_after  # noqa: E402
from stn.module import STNClassifier  # noqa: E402
from stn.run_folders import register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="figure")
@report_user_errors
def main(cfg: DictConfig) -> None:
    data = run_info(cfg.ckpt_path)["config"]["data"]
    model = STNClassifier.from_checkpoint(cfg.ckpt_path).eval()
    datamodule = MNISTDataModule(root=cfg.paths.data_dir, distortion=data["distortion"], eval_seed=data["eval_seed"])
    datamodule.setup("test")
    distorted = datamodule.test_set.images[: cfg.count]
    upright = read_split(datamodule.root, train=False)[0][: cfg.count]
    path = Path(cfg.paths.output_dir) / f"before_after_{data['distortion']}.png"
    save_image(before_after(model.transformer, distorted, upright, cfg.scale), path)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, cfg.output)
        print(f"Figure: {cfg.output}")
    print(f"Run folder: {cfg.paths.output_dir}")


if __name__ == "__main__":
    main()
