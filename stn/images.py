"""Image files as the model reads them (``scripts/warp.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from stn.errors import CorruptInputError, MissingInputError

__all__ = ["IMAGE_SUFFIXES", "image_files", "load_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def image_files(source: Path) -> list[Path]:
    """``source`` itself, or the image files of the folder ``source``, sorted by name."""
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not files or not all(p.is_file() for p in files):
        raise MissingInputError(
            f"input={source} is neither an image file nor a folder holding {', '.join(IMAGE_SUFFIXES)} "
            "files. Pass input=<image file or folder>."
        )
    return files


def load_image(path: Path, channels: int, size: tuple[int, int], invert: bool = False) -> torch.Tensor:
    """An image file as the model sees it: float ``(channels, H, W)`` in [0, 1] at ``size``.

    Any image mode and size is converted (grey for 1 channel, RGB for 3) and resized to ``size``,
    the image size the model was trained on.
    """
    try:
        with Image.open(path) as file:
            image = pil_to_tensor(file.convert("L" if channels == 1 else "RGB")).float() / 255
    except (UnidentifiedImageError, OSError) as error:
        raise CorruptInputError(
            f"{path} cannot be read as an image ({type(error).__name__}: {error}). Pass input= an image "
            f"file ({', '.join(IMAGE_SUFFIXES)}) or a folder of them."
        ) from error
    if invert:
        image = 1 - image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
