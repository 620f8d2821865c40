"""The distorted-MNIST benchmarks of Jaderberg et al. 2015 (Table 1), as seeded batched warps.

Each distortion is two steps. :func:`sample_params` draws its random parameters for a batch from a
``torch.Generator`` (on the generator's device); :func:`warp` applies them to the whole batch with one
``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``). :func:`distort` does both, and
:func:`distort_dataset` distorts a whole image set once, reproducibly, for evaluation.

=========  ==============================================================================  ========
name       what happens to the 28x28 digit                                                 output
=========  ==============================================================================  ========
``none``   nothing (uint8 / 255)                                                           28x28
``r``      rotated by U(-90°, 90°) about the image centre                                  28x28
``rts``    rotated by U(-45°, 45°), scaled by U(0.7, 1.2), placed uniformly at random on  42x42
           a 42x42 canvas (the scaled 28x28 frame stays inside the canvas)
``p``      scaled by U(0.75, 1.0), then each of its 4 corners moved by N(0, 5 px) in x     28x28
           and y; the projective map (homography) through the 4 corner pairs. Corner
           draws that fold the quadrilateral (about 1.3 %) are drawn again
``e``      scaled by U(0.75, 1.0), then each of the 16 points of a 4x4 grid over the      28x28
           image moved by N(0, 1.5 px) in x and y; the thin-plate spline through them
=========  ==============================================================================  ========

Units: pixels of the 28x28 digit, except ``rts`` shifts, which are pixels of the 42x42 canvas; angles
in radians, positive turns the digit clockwise as displayed (x right, y down).

``strength`` in [0, 1] scales every distortion towards none (angles, shifts and log-scales times
``strength``), for curricula that grow the distortion during training; evaluation is always at 1.
:func:`digit_map` turns drawn parameters into the map from the distorted image back to the upright
digit, which :mod:`stn.pose` uses to measure how much of the distortion a transformer undoes.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stn.errors import SettingError
from stn.tps import TPSGridGen

__all__ = [
    "DISTORTIONS",
    "check_distortion",
    "output_size",
    "to_float",
    "generator_seed",
    "sample_params",
    "similarity_grid",
    "projective_grid",
    "through_homography",
    "elastic_grid",
    "warp",
    "distort",
    "distort_with_map",
    "dataset_params",
    "distort_dataset",
    "digit_map",
]

DISTORTIONS = ("none", "r", "rts", "p", "e")

INPUT_SIZE = 28
CANVAS_SIZE = 42
R_MAX_ANGLE = math.radians(90.0)
RTS_MAX_ANGLE = math.radians(45.0)
RTS_SCALE = (0.7, 1.2)
P_SCALE = (0.75, 1.0)
P_CORNER_STD = 5.0
E_SCALE = (0.75, 1.0)
E_GRID = 4
E_POINT_STD = 1.5
EVAL_BLOCK = 1000

_PIXELS_PER_UNIT = INPUT_SIZE / 2  # normalised coordinates span 2 units across the 28 pixels
_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0), (1.0, 1.0))  # top-left, top-right, bottom-left, bottom-right
_OUTSIDE = 2.0  # a sampling position outside the image, where bilinear sampling reads only the zero padding


def check_distortion(name: str) -> str:
    """Return ``name`` if it is one of :data:`DISTORTIONS`, else raise a ``ValueError`` naming the fix."""
    if name not in DISTORTIONS:
        raise SettingError(
            f"Unknown MNIST distortion {name!r}. Choose one of {', '.join(DISTORTIONS)} (none: plain MNIST; "
            "r: rotated; rts: rotated, scaled and translated on a 42x42 canvas; p: projective; e: elastic), "
            "e.g. data.distortion=rts on the command line or distortion='rts' in Python."
        )
    return name


def output_size(name: str) -> tuple[int, int]:
    """``(H, W)`` of the images that distortion ``name`` produces."""
    side = CANVAS_SIZE if check_distortion(name) == "rts" else INPUT_SIZE
    return side, side


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, C, 28, 28)`` uint8 in [0, 255] or float in [0, 1] -> float ``dtype`` in [0, 1]."""
    if images.ndim != 4 or tuple(images.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        raise SettingError(
            f"MNIST distortions take undistorted digits of shape (N, C, 28, 28), got {tuple(images.shape)}. "
            "Add a channel dimension with images[:, None] and distort each image only once."
        )
    if images.dtype == torch.uint8:
        return images.to(dtype) / 255
    if not images.is_floating_point():
        raise SettingError(f"MNIST images must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}.")
    return images.to(dtype)


def generator_seed(*keys: int) -> int:
    """A 64-bit seed mixed from non-negative integer ``keys``, e.g. ``(tag, seed, epoch, rank)``.

    Distinct key tuples give unrelated seeds (numpy's SeedSequence hash); give every random stream
    its own leading tag key.
    """
    return int(np.random.SeedSequence([int(key) for key in keys]).generate_state(1, np.uint64)[0])


def _folded(scale: Tensor, corner_shift: Tensor) -> Tensor:
    """``(N,)`` True where the moved corners of ``p`` do not form a convex quadrilateral.

    A homography through a folded (non-convex or self-crossing) quadrilateral is no view of the image:
    it mirrors part of it and sends the rest to infinity, leaving an empty or shattered digit.
    """
    corners = torch.tensor(_CORNERS, device=scale.device, dtype=scale.dtype)[[0, 1, 3, 2]]  # walk around
    quad = scale[:, None, None] * corners + corner_shift[:, [0, 1, 3, 2]] / _PIXELS_PER_UNIT
    edges = quad.roll(-1, dims=1) - quad
    turns = edges[:, :, 0] * edges.roll(-1, dims=1)[:, :, 1] - edges[:, :, 1] * edges.roll(-1, dims=1)[:, :, 0]
    return ~((turns > 0).all(dim=1) | (turns < 0).all(dim=1))


def sample_params(
    name: str, count: int, generator: torch.Generator, dtype: torch.dtype = torch.float32, strength: float = 1.0
) -> dict[str, Tensor]:
    """Draw the random parameters of distortion ``name`` for ``count`` images.

    Draws happen on ``generator.device`` in a fixed order, so a generator state gives one result, and
    the same draws for every ``strength``: ``strength`` s multiplies angles, shifts and corner/point
    offsets by s and raises scales to the power s (s = 0: no distortion, s = 1: the benchmark).

    Returns:
        ``none``: ``{}``; ``r``: ``angle`` ``(N,)``; ``rts``: ``angle``, ``scale`` ``(N,)``, ``shift``
        ``(N, 2)`` canvas pixels; ``p``: ``scale``, ``corner_shift`` ``(N, 4, 2)`` pixels; ``e``:
        ``scale``, ``point_shift`` ``(N, 16, 2)`` pixels.
    """
    check_distortion(name)
    if not 0.0 <= strength <= 1.0:
        raise SettingError(f"The distortion strength must lie in [0, 1], got {strength}.")
    options = {"generator": generator, "device": generator.device, "dtype": dtype}

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(count, *shape, **options) * (high - low) + low

    def normal(std: float, *shape: int) -> Tensor:
        return torch.randn(count, *shape, **options) * std

    if name == "none":
        return {}
    if name == "r":
        return {"angle": uniform(-R_MAX_ANGLE, R_MAX_ANGLE) * strength}
    if name == "rts":
        angle = uniform(-RTS_MAX_ANGLE, RTS_MAX_ANGLE) * strength
        scale = uniform(*RTS_SCALE) ** strength
        room = (CANVAS_SIZE - INPUT_SIZE * scale) / 2
        return {"angle": angle, "scale": scale, "shift": uniform(-1.0, 1.0, 2) * room[:, None] * strength}
    if name == "p":
        scale = uniform(*P_SCALE) ** strength
        corner_shift = normal(P_CORNER_STD, 4, 2) * strength
        folded = _folded(scale, corner_shift)
        while bool(folded.any()):
            corner_shift = torch.where(folded[:, None, None], normal(P_CORNER_STD, 4, 2) * strength, corner_shift)
            folded = _folded(scale, corner_shift)
        return {"scale": scale, "corner_shift": corner_shift}
    scale = uniform(*E_SCALE) ** strength
    return {"scale": scale, "point_shift": normal(E_POINT_STD, E_GRID * E_GRID, 2) * strength}


def _pixel_centres(size: int, like: Tensor) -> Tensor:
    """Pixel centres ``(size,)`` in pixels from the image centre: ``-size/2 + 0.5 ... size/2 - 0.5``."""
    return torch.arange(size, device=like.device, dtype=like.dtype) + (0.5 - size / 2)


def similarity_grid(angle: Tensor, scale: Tensor, shift: Tensor, size: int) -> Tensor:
    """Grid that shows the 28x28 input turned by ``angle``, scaled by ``scale`` and moved by ``shift``.

    Args:
        angle: ``(N,)`` radians, positive clockwise as displayed.
        scale: ``(N,)`` factor about the image centre.
        shift: ``(N, 2)`` xy pixels of the output; the digit centre lands ``shift`` from the output centre.
        size: output side in pixels (28, or 42 for the rts canvas).

    Returns:
        ``(N, size, size, 2)`` sampling grid for ``F.grid_sample(..., align_corners=False)``.
        Built elementwise (no matmul), so its values do not depend on batch size or threads.
    """
    x = _pixel_centres(size, angle)[None, None, :] - shift[:, 0, None, None]
    y = _pixel_centres(size, angle)[None, :, None] - shift[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    per_unit = scale[:, None, None] * _PIXELS_PER_UNIT
    # input position = R(angle)^T (output position - shift) / scale, in the input's normalised units
    return torch.stack([(cos * x + sin * y) / per_unit, (cos * y - sin * x) / per_unit], dim=-1)


def _homography(source: Tensor, target: Tensor) -> Tensor:
    """Homographies ``(N, 3, 3)`` (last entry 1) mapping 4 ``source`` points ``(N, 4, 2)`` onto ``target``."""
    x, y = source.unbind(-1)
    u, v = target.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)
    coefficients = torch.linalg.solve(system, torch.cat([u, v], dim=1))
    return torch.cat([coefficients, one[:, :1]], dim=1).view(-1, 3, 3)


def projective_grid(scale: Tensor, corner_shift: Tensor) -> Tensor:
    """Grid of the homography that takes the image corners to ``scale * corner + corner_shift``.

    Args:
        scale: ``(N,)`` factor about the image centre.
        corner_shift: ``(N, 4, 2)`` xy pixels added to the scaled corners (top-left, top-right,
            bottom-left, bottom-right).

    Returns:
        ``(N, 28, 28, 2)`` sampling grid for ``F.grid_sample(..., align_corners=False)``.
    """
    corners = torch.tensor(_CORNERS, device=scale.device, dtype=scale.dtype).expand(scale.shape[0], -1, -1)
    moved = scale[:, None, None] * corners + corner_shift / _PIXELS_PER_UNIT
    homography = _homography(moved, corners)  # output -> input, (N, 3, 3)
    ticks = _pixel_centres(INPUT_SIZE, scale) / _PIXELS_PER_UNIT
    pixels = torch.stack([ticks[None, :].expand(INPUT_SIZE, -1), ticks[:, None].expand(-1, INPUT_SIZE)], dim=-1)
    grid = through_homography(pixels[None], homography)
    # Pixels on or beyond the horizon show no point of the image: they read outside it, as every position
    # clamped to [-2, 2] still does where it did (beyond half a pixel outside the image, bilinear sampling
    # reads only the zero padding).
    return grid.nan_to_num(nan=_OUTSIDE).clamp(-_OUTSIDE, _OUTSIDE)


def through_homography(points: Tensor, homography: Tensor) -> Tensor:
    """Positions ``(N, ..., 2)`` (or broadcastable to it) taken through ``homography`` ``(N, 3, 3)``.

    Elementwise (no matmul), so a position's value does not depend on the batch or the threads.

    Returns:
        ``(N, ..., 2)``; NaN at positions on or beyond the map's horizon (:func:`_in_front`), where the
        quotient is mirrored or infinite and shows no point of the image the map reads.
    """
    h = homography.reshape(homography.shape[0], *(1,) * (points.dim() - 2), 3, 3)
    x, y = points[..., 0], points[..., 1]
    depth = h[..., 2, 0] * x + h[..., 2, 1] * y + h[..., 2, 2]
    mapped_x = (h[..., 0, 0] * x + h[..., 0, 1] * y + h[..., 0, 2]) / depth
    mapped_y = (h[..., 1, 0] * x + h[..., 1, 1] * y + h[..., 1, 2]) / depth
    front = _in_front(homography).reshape(-1, *(1,) * (points.dim() - 2))
    mapped = torch.stack([mapped_x, mapped_y], dim=-1)
    return torch.where((depth * front > 0)[..., None], mapped, torch.full_like(mapped, math.nan))


def _in_front(homography: Tensor) -> Tensor:
    """``(N,)`` +1 or -1: the sign of the depth (the third homogeneous coordinate) of ``homography``
    ``(N, 3, 3)`` at the position it takes to the origin of the image it reads (the digit's centre).

    Positions whose depth has that sign lie on the image's side of the map's horizon; the others, where
    the quotient is mirrored or infinite, show no point of it. It is the sign of the inverse's last entry,
    ``(a e - b d) / det``, written out (a batched inverse checks for singular matrices: a device sync).
    """
    (a, b, c), (d, e, f), (g, h, i) = (row.unbind(-1) for row in homography.unbind(-2))
    determinant = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return ((a * e - b * d) * determinant).sign()


def _elastic_points() -> Tensor:
    """The 4x4 grid over the whole image, ``(16, 2)`` float64, row-major (x fastest) as ``grid_points``."""
    ticks = torch.linspace(-1.0, 1.0, E_GRID, dtype=torch.float64)
    y, x = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


@functools.lru_cache(maxsize=None)
def _elastic_generator(device: torch.device) -> TPSGridGen:
    return TPSGridGen(_elastic_points(), size=(INPUT_SIZE, INPUT_SIZE), align_corners=False).to(device)


def elastic_grid(scale: Tensor, point_shift: Tensor) -> Tensor:
    """Grid of the thin-plate spline through a 4x4 grid of points, scaled and then moved.

    Output grid point ``c`` reads the input at ``(c - point_shift / 14) / scale`` (normalised units): the
    image scaled by ``scale`` with the content at each grid point moved by ``point_shift`` pixels.
    One :class:`stn.tps.TPSGridGen` matmul for the whole batch.

    Args:
        scale: ``(N,)`` factor about the image centre.
        point_shift: ``(N, 16, 2)`` xy pixels, grid points row-major (x fastest).

    Returns:
        ``(N, 28, 28, 2)`` sampling grid for ``F.grid_sample(..., align_corners=False)``.
    """
    generator = _elastic_generator(scale.device)
    target = _elastic_points().to(device=scale.device, dtype=scale.dtype)
    source = (target - point_shift / _PIXELS_PER_UNIT) / scale[:, None, None]
    return generator(source)


def warp(images: Tensor, name: str, params: dict[str, Tensor]) -> Tensor:
    """Apply distortion ``name`` with ``params`` (from :func:`sample_params`) to a batch.

    Args:
        images: ``(N, C, 28, 28)`` uint8 in [0, 255] or float in [0, 1].

    Returns:
        ``(N, C, H, W)`` float in [0, 1] (float32 for uint8 input), ``(H, W)`` = :func:`output_size`.
    """
    check_distortion(name)
    images = to_float(images, images.dtype if images.is_floating_point() else torch.float32)
    if name == "none":
        return images
    if name in ("r", "rts"):
        angle = params["angle"]
        scale = params.get("scale", torch.ones_like(angle))
        shift = params.get("shift", angle.new_zeros(angle.shape[0], 2))
        grid = similarity_grid(angle, scale, shift, output_size(name)[0])
    elif name == "p":
        grid = projective_grid(params["scale"], params["corner_shift"])
    else:
        grid = elastic_grid(params["scale"], params["point_shift"])
    warped = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.clamp_(0.0, 1.0)


def distort(images: Tensor, name: str, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Distort a batch with fresh random parameters from ``generator``.

    Args:
        images: ``(N, C, 28, 28)`` uint8 in [0, 255] or float in [0, 1], on ``generator.device``.
        name: one of :data:`DISTORTIONS`.
        generator: drives every random choice; it advances by one draw per parameter tensor.
        strength: in [0, 1], how much of the distortion to apply (see :func:`sample_params`).

    Returns:
        ``(N, C, H, W)`` float in [0, 1], ``(H, W)`` = :func:`output_size` (42x42 for rts, else 28x28).
    """
    return warp(images, name, _draw(images, name, generator, strength))


def distort_with_map(
    images: Tensor, name: str, generator: torch.Generator, strength: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`distort`, and the :func:`digit_map` of each image: the same draws, the same images."""
    params = _draw(images, name, generator, strength)
    return warp(images, name, params), digit_map(name, params)


def _draw(images: Tensor, name: str, generator: torch.Generator, strength: float) -> dict[str, Tensor]:
    if images.device.type != generator.device.type:
        raise SettingError(
            f"The images are on {images.device} but the generator is on {generator.device}; draw distortions "
            "on the images' device: torch.Generator(device=images.device).manual_seed(seed)."
        )
    dtype = images.dtype if images.is_floating_point() else torch.float32
    return sample_params(name, images.shape[0], generator, dtype, strength)


def dataset_params(name: str, count: int, seed: int) -> dict[str, Tensor]:
    """The parameters :func:`distort_dataset` draws for ``count`` images, float64 on the CPU.

    Block ``k`` of :data:`EVAL_BLOCK` images draws from a CPU generator seeded from ``(seed, k)``.
    """
    blocks = []
    for index, start in enumerate(range(0, count, EVAL_BLOCK)):
        generator = torch.Generator().manual_seed(generator_seed(seed, index))
        blocks.append(sample_params(name, min(EVAL_BLOCK, count - start), generator, torch.float64))
    if not blocks:
        return {}
    return {key: torch.cat([block[key] for block in blocks]) for key in blocks[0]}


def distort_dataset(images: Tensor, name: str, seed: int, params: dict[str, Tensor] | None = None) -> Tensor:
    """Distort a whole image set once, the same way on every machine, for any thread count.

    The parameters are :func:`dataset_params` ``(name, N, seed)`` (pass them as ``params`` when they
    are already drawn); the maths runs in float64, block by block, and the result is rounded to float32.

    Args:
        images: ``(N, C, 28, 28)`` uint8 in [0, 255] or float in [0, 1].
        seed: non-negative integer.

    Returns:
        ``(N, C, H, W)`` float32 in [0, 1] on the CPU.
    """
    if params is None:
        params = dataset_params(name, images.shape[0], seed)
    blocks = []
    for start in range(0, images.shape[0], EVAL_BLOCK):
        block = to_float(images[start : start + EVAL_BLOCK].cpu(), torch.float64)
        block_params = {key: value[start : start + EVAL_BLOCK] for key, value in params.items()}
        blocks.append(warp(block, name, block_params).float())
    if not blocks:
        return torch.empty(0, images.shape[1], *output_size(name))
    return torch.cat(blocks)


def digit_map(name: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The map from the distorted image back to the undistorted digit, for drawn ``params``.

    A position ``u`` of the distorted image (normalised xy of its own frame, ``grid_sample``'s
    convention with ``align_corners=False``) shows the content of the original 28x28 digit at
    ``digit_map(u)``, in pixels from the digit's centre: exactly the positions :func:`warp`'s
    sampling grid reads, at every point, not only at pixel centres.

    Returns:
        ``{}`` for ``none``; ``{"homography": (N, 3, 3)}`` for ``r``, ``rts`` (similarities) and ``p``;
        ``{"tps_source": (N, 16, 2), "tps_target": (N, 16, 2)}`` for ``e`` (the thin-plate spline
        taking ``tps_target`` to ``tps_source``, :func:`stn.tps.warp_points`). Apply it with
        :func:`stn.pose.to_digit`.
    """
    check_distortion(name)
    if name == "none":
        return {}
    if name in ("r", "rts"):
        angle = params["angle"]
        scale = params.get("scale", torch.ones_like(angle))
        shift = params.get("shift", angle.new_zeros(angle.shape[0], 2))
        half = output_size(name)[0] / 2
        cos, sin = angle.cos() / scale, angle.sin() / scale
        zero, one = torch.zeros_like(angle), torch.ones_like(angle)
        # digit pixels = R(angle)^T (half * u - shift) / scale, as in similarity_grid
        rows = [
            torch.stack([cos * half, sin * half, -(cos * shift[:, 0] + sin * shift[:, 1])], dim=-1),
            torch.stack([-sin * half, cos * half, sin * shift[:, 0] - cos * shift[:, 1]], dim=-1),
            torch.stack([zero, zero, one], dim=-1),
        ]
        return {"homography": torch.stack(rows, dim=1)}
    if name == "p":
        scale, corner_shift = params["scale"], params["corner_shift"]
        corners = torch.tensor(_CORNERS, device=scale.device, dtype=scale.dtype).expand(scale.shape[0], -1, -1)
        moved = scale[:, None, None] * corners + corner_shift / _PIXELS_PER_UNIT
        to_pixels = torch.diag(scale.new_tensor([_PIXELS_PER_UNIT, _PIXELS_PER_UNIT, 1.0]))
        return {"homography": to_pixels @ _homography(moved, corners)}
    scale, point_shift = params["scale"], params["point_shift"]
    target = _elastic_points().to(device=scale.device, dtype=scale.dtype)
    source = (target - point_shift / _PIXELS_PER_UNIT) / scale[:, None, None]
    return {"tps_source": source * _PIXELS_PER_UNIT, "tps_target": target.expand_as(source).clone()}
