"""Before/after figures of a trained spatial transformer: upright digit, distorted input, warped output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from stn.transformer import SpatialTransformer
from stn.viz import draw_mesh, upscale

__all__ = ["before_after"]


@torch.no_grad()
def before_after(transformer: SpatialTransformer, distorted: Tensor, upright: Tensor, scale: int = 4) -> Tensor:
    """Three rows of ``N`` cells, ``(3, H', W')`` float in [0, 1]:

    1. the undistorted digits ``upright`` ``(N, C, 28, 28)`` (uint8 or float);
    2. the distorted inputs ``distorted`` ``(N, C, H, W)`` with the transformer's sampling mesh;
    3. what the transformer makes of them (its output, which the classifier reads).

    Every cell is ``scale * H`` pixels square (nearest-neighbour upscaling).
    """
    cell = scale * distorted.shape[-1]
    grid = transformer.grid(transformer.localize(distorted), distorted)
    warped = transformer.sample(distorted, grid)
    upright = upright.float() / 255 if upright.dtype == torch.uint8 else upright.float()
    rows = [
        _resize(upscale(upright, 1), cell),
        draw_mesh(distorted, grid, transformer.align_corners, scale=scale),
        _resize(upscale(warped, 1), cell),
    ]
    return make_grid(torch.cat(rows).float() / 255, nrow=distorted.shape[0], padding=2, pad_value=0.5)


def _resize(images: Tensor, size: int) -> Tensor:
    """uint8 ``(N, 3, h, w)`` -> uint8 ``(N, 3, size, size)``, nearest neighbour."""
    return F.interpolate(images.float(), size=(size, size), mode="nearest").round().to(torch.uint8)
