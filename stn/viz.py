"""Pictures of what a spatial transformer does: image grids, control points, sampling meshes.

Images come in as ``(N, C, H, W)`` floats in ``[0, 1]`` (C = 1 or 3); overlays are drawn on a
nearest-neighbour upscaled copy (``scale`` x) so that points and lines stay visible on 28x28
digits. Points and grids are in normalised xy (the ``grid_sample`` frame) of the input image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.utils import draw_keypoints, make_grid

from stn.transformer import SpatialTransformer

__all__ = ["image_grid", "draw_points", "draw_mesh", "to_pixels", "upscale", "transformer_panels"]


def image_grid(images: Tensor, nrow: int = 8) -> Tensor:
    """Tile images ``(N, C, H, W)`` (float in [0, 1] or uint8) into one ``(3, H', W')`` float image."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=0.5)


def to_pixels(points: Tensor, size: tuple[int, int], align_corners: bool, scale: int = 1) -> Tensor:
    """Normalised xy ``(..., 2)`` -> pixel xy ``(..., 2)`` of an image of ``size`` upscaled ``scale`` x.

    Uses the ``grid_sample`` convention: with ``align_corners=False`` -1 and 1 are the outer
    edges of the border pixels, with ``True`` their centres.
    """
    height, width = size
    extent = points.new_tensor([width, height])
    if align_corners:
        pixels = (points + 1) / 2 * (extent - 1)
    else:
        pixels = ((points + 1) * extent - 1) / 2
    return pixels * scale + (scale - 1) / 2


def upscale(images: Tensor, scale: int = 4) -> Tensor:
    """``(N, C, H, W)`` floats in [0, 1] -> nearest-neighbour upscaled ``(N, 3, H*scale, W*scale)`` uint8."""
    return _canvas(images, scale)


def _canvas(images: Tensor, scale: int) -> Tensor:
    """``(N, C, H, W)`` floats in [0, 1] -> ``(N, 3, H*scale, W*scale)`` uint8."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return (images * 255).round().to(torch.uint8)


def draw_points(
    images: Tensor, points: Tensor, align_corners: bool = False, scale: int = 4,
    color: str = "red", radius: int = 2,
) -> Tensor:
    """Draw points ``(N, P, 2)`` on images ``(N, C, H, W)`` -> ``(N, 3, H*scale, W*scale)`` uint8."""
    canvas = _canvas(images, scale)
    pixels = to_pixels(points.detach().float().cpu(), tuple(images.shape[-2:]), align_corners, scale)
    return torch.stack([
        draw_keypoints(image, keypoints[None], colors=color, radius=radius)
        for image, keypoints in zip(canvas, pixels)
    ])


def draw_mesh(
    images: Tensor, grid: Tensor, align_corners: bool = False, lines: int = 8, scale: int = 4,
    color: str = "lime",
) -> Tensor:
    """Draw the sampling grid ``(N, H', W', 2)`` as a mesh on images ``(N, C, H, W)``.

    Every output row and column of a ``lines`` x ``lines`` subset (first and last included) is
    drawn where it reads the input, so the mesh shows how the transform bends the input.

    Returns:
        ``(N, 3, H*scale, W*scale)`` uint8.
    """
    out_height, out_width = grid.shape[1:3]
    ys = torch.linspace(0, out_height - 1, min(lines, out_height)).round().long()
    xs = torch.linspace(0, out_width - 1, min(lines, out_width)).round().long()
    nodes = grid.detach().float().cpu()[:, ys][:, :, xs]
    rows, cols = len(ys), len(xs)
    edges = [(r * cols + c, r * cols + c + 1) for r in range(rows) for c in range(cols - 1)]
    edges += [(r * cols + c, (r + 1) * cols + c) for r in range(rows - 1) for c in range(cols)]
    pixels = to_pixels(nodes.reshape(len(nodes), -1, 2), tuple(images.shape[-2:]), align_corners, scale)
    canvas = _canvas(images, scale)
    return torch.stack([
        draw_keypoints(image, keypoints[None], connectivity=edges, colors=color, radius=1, width=1)
        for image, keypoints in zip(canvas, pixels)
    ])


@torch.no_grad()
def transformer_panels(transformer: SpatialTransformer, images: Tensor, scale: int = 4) -> dict[str, Tensor]:
    """What a transformer does to images ``(N, C, H, W)``, as TensorBoard grids ``(3, H', W')`` in [0, 1].

    Keys: ``input``, ``warped`` (both upscaled ``scale`` x), ``control_points`` (the target-point layout
    where the transform reads it, on the input) and ``mesh`` (the deformed sampling grid on the input).
    """
    params = transformer.localize(images)
    grid = transformer.grid(params, images)
    points = transformer.control_points(params, images.shape[0])
    align_corners = transformer.align_corners
    return {
        "input": image_grid(upscale(images, scale)),
        "warped": image_grid(upscale(transformer.sample(images, grid), scale)),
        "control_points": image_grid(draw_points(images, points, align_corners, scale)),
        "mesh": image_grid(draw_mesh(images, grid, align_corners, scale=scale)),
    }
