"""Write a PNG of distorted MNIST as the model will see it, and print its path.

    python scripts/preview_data.py data.distortion=rts

Left panel: training-style samples (fresh distortions, as in epoch 0 of a run with this seed). Right
panel: the first images of the fixed test set, on which every run is scored. The PNG lands in the run
folder (outputs/YYYY-MM-DD/HH-MM-SS/).
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from stn.cli import report_user_errors  # noqa: E402
from stn.runner import register_resolvers  # noqa: E402


register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="preview_data")
@report_user_errors
def main(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    count = cfg.rows * cfg.rows
    raw = datamodule.train_set.images[:count]
    train = datamodule.distort(raw, datamodule.training_generator(epoch=0))
    test = datamodule.test_set.images[:count]
    panels = [make_grid(images, nrow=cfg.rows, padding=2, pad_value=0.5) for images in (train, test)]
    gap = torch.ones(3, panels[0].shape[1], 8)
    path = Path(cfg.paths.output_dir) / f"mnist_{datamodule.distortion}.png"
    save_image(torch.cat([panels[0], gap, panels[1]], dim=2), path)
    print(f"training-style samples (left) and the fixed test set (right), {datamodule.image_size[0]}x{datamodule.image_size[1]}:")
    print(path)


if __name__ == "__main__":
    main()
