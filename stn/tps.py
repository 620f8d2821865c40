"""Thin-plate-spline (TPS) maths: control-point layouts, grid generation, warping.

Coordinates are normalised ``xy`` in ``[-1, 1]`` (x right, y down), the frame of
:func:`torch.nn.functional.grid_sample`. ``target_points`` ``(T, 2)`` are fixed points of the
OUTPUT image; ``source_points`` ``(N, T, 2)`` are where those points are read from in the INPUT
image. The spline ``f`` maps every output position ``p`` to the input position

    f(p) = a_0 + a_x x + a_y y + sum_i w_i U(|p - c_i|),   U(r) = r^2 log r^2,

with ``f(c_i) = s_i`` exactly for every target point ``c_i`` and source point ``s_i``.
Solving for ``(w, a)`` is linear in the source points, so for a fixed output grid the whole
map is one matrix ``M`` ``(H*W, T)``: ``grid = M @ source_points``. :class:`TPSGridGen` builds
``M`` once, in float64, and a forward pass is a single matrix product.

This module depends on torch alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.errors import SettingError

__all__ = ["grid_points", "TPSGridGen", "tps_warp", "warp_points", "bending_energy"]


def grid_points(rows: int, cols: int, margin: float = 0.0) -> Tensor:
    """A regular ``rows`` x ``cols`` layout of control points in normalised xy.

    Points run row-major (x fastest), from ``-1 + margin`` to ``1 - margin`` on both axes.

    Returns:
        ``(rows * cols, 2)`` float32 tensor.
    """
    if int(rows) != rows or int(cols) != cols or rows < 2 or cols < 2:
        raise SettingError(
            f"A TPS control-point grid needs at least 2 rows and 2 columns, got rows={rows}, "
            f"cols={cols}: a single row or column puts every point on one line, which leaves the "
            "spline undetermined. Set the grid (e.g. model.tps.rows / model.tps.cols) to 2 or more."
        )
    if not 0.0 <= margin < 1.0:
        raise SettingError(
            f"The control-point margin must lie in [0, 1), got margin={margin}: it is the inset "
            "from the image border in normalised units, and 1 or more collapses the grid to a "
            "point. Set the margin (e.g. model.tps.margin) to a value such as 0.0 or 0.1."
        )
    ys = torch.linspace(-1.0 + margin, 1.0 - margin, int(rows), dtype=torch.float64)
    xs = torch.linspace(-1.0 + margin, 1.0 - margin, int(cols), dtype=torch.float64)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2).float()


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    """``U(|a_i - b_j|) = r^2 log r^2`` for ``a`` ``(P, 2)``, ``b`` ``(T, 2)`` -> ``(P, T)``."""
    r2 = (a[:, None, :] - b[None, :, :]).square().sum(-1)
    return torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(torch.finfo(r2.dtype).tiny)), 0.0)


def _check_target_points(target_points: Tensor) -> Tensor:
    """Validate ``(T, 2)`` target points and return them as float64 on their device."""
    if target_points.ndim != 2 or target_points.shape[-1] != 2:
        raise SettingError(
            f"target_points must have shape (T, 2) in normalised xy, got {tuple(target_points.shape)}. "
            "Build them with stn.tps.grid_points(rows, cols) or pass a (T, 2) tensor."
        )
    count = target_points.shape[0]
    if count < 3:
        raise SettingError(
            f"A thin-plate spline needs at least 3 non-collinear control points, got T={count}. "
            "Use a layout with more points, e.g. grid_points(2, 2) or larger."
        )
    points = target_points.detach().to(torch.float64)
    if not torch.isfinite(points).all():
        raise SettingError("target_points contain NaN or infinity; every control point must be finite.")
    gaps = torch.cdist(points, points) + torch.eye(count, dtype=points.dtype, device=points.device)
    if gaps.min() < 1e-9:
        i, j = divmod(int(torch.argmin(gaps)), count)
        raise SettingError(
            f"target_points {i} and {j} coincide ({points[i].tolist()}); duplicate control points "
            "make the TPS system singular. Remove duplicates or use a layout with distinct points."
        )
    spread = torch.linalg.svdvals(points - points.mean(0))
    if spread[-1] < 1e-9 * max(1.0, float(spread[0])):
        raise SettingError(
            f"All {count} target_points lie on one line, so the affine part of the TPS system is "
            "singular. Use control points that span both axes, e.g. grid_points(rows>=2, cols>=2)."
        )
    return points


def _system_inverse(points: Tensor) -> Tensor:
    """Inverse of the TPS system matrix ``L`` ``(T+3, T+3)`` for float64 ``(T, 2)`` points.

    ``L = [[K, P], [P^T, 0]]`` with ``K_ij = U(|c_i - c_j|)`` and ``P = [1, x, y]``.
    """
    count = points.shape[0]
    affine = torch.cat([torch.ones_like(points[:, :1]), points], dim=1)
    system = torch.zeros(count + 3, count + 3, dtype=torch.float64, device=points.device)
    system[:count, :count] = _kernel(points, points)
    system[:count, count:] = affine
    system[count:, :count] = affine.T
    inverse = torch.linalg.inv(system)
    residual = (system @ inverse - torch.eye(count + 3, dtype=torch.float64, device=points.device)).abs().max()
    if not torch.isfinite(inverse).all() or residual > 1e-6:
        raise SettingError(
            f"The TPS system for these {count} target_points is singular or ill-conditioned "
            f"(inverse residual {float(residual):.2e}). Spread the control points out: nearly "
            "coincident or nearly collinear points make the spline undetermined."
        )
    return inverse


def _map_rows(positions: Tensor, points: Tensor, inverse: Tensor) -> Tensor:
    """Rows ``[U(|p - c|), 1, p] @ L^-1[:, :T]`` ``(P, T)``: positions -> weights on sources."""
    basis = torch.cat([_kernel(positions, points), torch.ones_like(positions[:, :1]), positions], dim=1)
    return basis @ inverse[:, : points.shape[0]]


def _base_grid(size: tuple[int, int], align_corners: bool, device: torch.device | None = None) -> Tensor:
    """Identity sampling grid ``(H*W, 2)``, float64, exactly as ``F.affine_grid`` builds it."""
    identity = torch.eye(2, 3, dtype=torch.float64, device=device)[None]
    return F.affine_grid(identity, [1, 1, *size], align_corners=align_corners).reshape(-1, 2)


def _check_size(size: tuple[int, int] | list[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise SettingError(f"The output size must be (H, W) with positive integers, got {size!r}.")
    return int(size[0]), int(size[1])


def _check_source_points(source_points: Tensor, count: int) -> None:
    """Shape and dtype of ``(N, T, 2)`` source points; their values are not read (no device sync)."""
    if source_points.ndim != 3 or source_points.shape[1:] != (count, 2):
        raise SettingError(
            f"source_points must have shape (N, {count}, 2) to match the {count} target points, got "
            f"{tuple(source_points.shape)}. The localization network must predict one xy pair per "
            "control point."
        )
    if not source_points.is_floating_point():
        raise SettingError(f"source_points must be a floating-point tensor, got {source_points.dtype}.")


def _check_finite(source_points: Tensor) -> None:
    """Refuse NaN or infinite source points (reads them back: one device sync)."""
    if not torch.isfinite(source_points).all():
        raise SettingError(
            "source_points contain NaN or infinity. If they come from a localization network, its "
            "training has diverged: lower the loc-net learning rate or bound its outputs (tanh)."
        )


def _exact_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in the inputs' own dtype, also where autocast would lower it to 16 bits."""
    if torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return a @ b
    return a @ b


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """TPS maths runs in float64 for float64 input and in float32 otherwise (also under autocast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TPSGridGen(nn.Module):
    """Thin-plate-spline sampling-grid generator for a fixed set of target points.

    The ``(T+3) x (T+3)`` TPS system is inverted once, in float64, at construction, and the
    per-pixel map ``M`` ``(H*W, T)`` is kept as a buffer; :meth:`forward` is one matrix product
    ``(2N, T) @ (T, H*W)`` that writes the x and y planes of the grid; the returned ``(N, H, W, 2)``
    grid is a view of those planes (``grid_sample`` reads it at full speed; call ``.contiguous()``
    if you need interleaved xy). Another output size gets its own ``M``, built and cached on first
    use. :meth:`warp_points` and :meth:`bending_energy` use the same inverse.

    Calls check the shape and dtype of ``source_points``, never their values, so a forward pass never
    waits on the device: non-finite source points give a non-finite grid (as ``F.affine_grid`` does
    with a non-finite ``theta``), which training catches as a NaN loss (:mod:`stn.divergence`).

    Args:
        target_points: ``(T, 2)`` control points in the output frame, normalised xy.
        size: output ``(H, W)``.
        align_corners: the ``grid_sample`` / ``affine_grid`` convention the grid is built for.
        check_finite: also refuse NaN or infinite source points with an error, at the cost of one
            device sync per call (for debugging).

    Example:
        >>> gen = TPSGridGen(grid_points(4, 4), size=(28, 28))
        >>> grid = gen(gen.target_points.expand(8, -1, -1))  # identity: (8, 28, 28, 2)
    """

    target_points: Tensor
    matrix: Tensor

    def __init__(self, target_points: Tensor, size: tuple[int, int] = (28, 28), align_corners: bool = False,
                 check_finite: bool = False):
        super().__init__()
        points = _check_target_points(torch.as_tensor(target_points))
        self.size = _check_size(size)
        self.align_corners = bool(align_corners)
        self.check_finite = bool(check_finite)
        self._points = points.cpu()
        self._inverse = _system_inverse(self._points)
        self._system = (self._points, self._inverse)  # float64, on this module's device
        self.register_buffer("target_points", points.float(), persistent=False)
        self.register_buffer("matrix", self._build(self.size), persistent=False)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_points(self) -> int:
        return self.target_points.shape[0]

    def _build(self, size: tuple[int, int]) -> Tensor:
        """``M`` ``(H*W, T)`` in float64 on the CPU for output ``size``."""
        return _map_rows(_base_grid(size, self.align_corners), self._points, self._inverse)

    def map_matrix(self, size: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The per-pixel map ``M`` ``(H*W, T)`` for ``size`` on this module's device, in ``dtype``."""
        size = self.size if size is None else _check_size(size)
        key = (size, dtype, self.matrix.device)
        cached = self._cache.get(key)
        if cached is None:
            full = self.matrix if size == self.size else self._build(size)
            cached = full.to(device=self.matrix.device, dtype=dtype).contiguous()
            self._cache[key] = cached
        return cached

    def _apply(self, fn, recurse: bool = True):
        """Device moves follow the module; dtype casts do not: the map stays exact, in float64."""
        super()._apply(fn, recurse)
        device = self.matrix.device
        self.target_points = self._points.to(device=device, dtype=torch.float32)
        self.matrix = self._build(self.size).to(device)
        self._system = (self._points.to(device), self._inverse.to(device))
        self._cache = {}
        return self

    def _check(self, source_points: Tensor) -> None:
        _check_source_points(source_points, self.num_points)
        if self.check_finite:
            _check_finite(source_points)

    def forward(self, source_points: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Sampling grid for ``source_points`` ``(N, T, 2)`` -> ``(N, H, W, 2)``.

        ``grid[n, i, j]`` is the input position that output pixel ``(i, j)`` reads; feed it to
        ``F.grid_sample(image, grid, align_corners=self.align_corners)``.
        """
        batch, count = source_points.shape[:2]
        self._check(source_points)
        height, width = self.size if size is None else _check_size(size)
        dtype = _compute_dtype(source_points.dtype)
        matrix = self.map_matrix((height, width), dtype)
        sources = source_points.to(dtype).transpose(1, 2).reshape(2 * batch, count)
        planes = _exact_matmul(sources, matrix.T)
        return planes.view(batch, 2, height, width).permute(0, 2, 3, 1)

    def warp_points(self, points: Tensor, source_points: Tensor) -> Tensor:
        """The TPS map of output-frame ``points`` ``(N, P, 2)`` -> input frame ``(N, P, 2)``.

        The map the grid is made of, at any positions: target points go exactly to source points.
        """
        self._check(source_points)
        if points.ndim != 3 or points.shape[-1] != 2 or points.shape[0] != source_points.shape[0]:
            raise SettingError(
                f"points must have shape (N, P, 2) with N={source_points.shape[0]} as in source_points, "
                f"got {tuple(points.shape)}."
            )
        dtype = _compute_dtype(torch.promote_types(points.dtype, source_points.dtype))
        system_points, inverse = self._system
        batch, count = points.shape[:2]
        with torch.autocast(points.device.type, enabled=False):
            rows = _map_rows(points.reshape(-1, 2).double(), system_points, inverse)
            rows = rows.to(dtype).view(batch, count, -1)
            return rows @ source_points.to(dtype)

    def bending_energy(self, source_points: Tensor) -> Tensor:
        """Integral bending energy ``(N,)`` of the TPS to ``source_points`` ``(N, T, 2)`` (see
        :func:`bending_energy`), in the dtype of ``source_points`` (float32 under autocast)."""
        self._check(source_points)
        dtype = _compute_dtype(source_points.dtype)
        bending = self._system[1][: self.num_points, : self.num_points].to(dtype)
        with torch.autocast(source_points.device.type, enabled=False):
            sources = source_points.to(dtype)
            return 16 * math.pi * torch.einsum("ntk,ts,nsk->n", sources, bending, sources)

    def extra_repr(self) -> str:
        return f"num_points={self.num_points}, size={self.size}, align_corners={self.align_corners}"


def _check_image(image: Tensor, source_points: Tensor) -> None:
    if image.ndim != 4:
        raise SettingError(
            f"image must have shape (N, C, H, W), got {tuple(image.shape)}. Add a batch dimension "
            "with image[None] or a channel dimension with image[:, None]."
        )
    if image.shape[0] != source_points.shape[0]:
        raise SettingError(
            f"image batch size {image.shape[0]} does not match source_points batch size "
            f"{source_points.shape[0]}; pass one set of control points per image."
        )


def tps_warp(
    image: Tensor,
    source_points: Tensor,
    target_points: Tensor,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
    padding_mode: str = "border",
) -> Tensor:
    """Warp ``image`` ``(N, C, H, W)`` with the TPS that maps target to source points.

    Args:
        image: ``(N, C, H, W)`` input.
        source_points: ``(N, T, 2)`` where each target point reads from, input frame.
        target_points: ``(T, 2)`` control points of the output frame.
        size: output ``(H', W')``; the input size when ``None``.
        align_corners: ``grid_sample`` convention.
        padding_mode: ``grid_sample`` padding for reads outside the input.

    Returns:
        ``(N, C, H', W')`` warped image. For repeated warps with the same target points build a
        :class:`TPSGridGen` once instead: this function solves the TPS system on every call and
        refuses non-finite source points (reading them back).
    """
    _check_image(image, source_points)
    size = tuple(image.shape[-2:]) if size is None else size
    generator = TPSGridGen(target_points, size=size, align_corners=align_corners, check_finite=True).to(image.device)
    grid = generator(source_points)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)


def warp_points(points: Tensor, source_points: Tensor, target_points: Tensor) -> Tensor:
    """Apply the TPS map to output-frame ``points`` ``(N, P, 2)`` -> input-frame ``(N, P, 2)``.

    This is the map the sampling grid is made of: a point ``p`` of the output image is read from
    ``warp_points(p)`` in the input image. Target points map exactly to source points. Solves the
    TPS system on every call (:meth:`TPSGridGen.warp_points` reuses one) and refuses non-finite
    source points.
    """
    return TPSGridGen(target_points, check_finite=True).to(points.device).warp_points(points, source_points)


def bending_energy(source_points: Tensor, target_points: Tensor) -> Tensor:
    """Integral bending energy of the TPS that maps target to source points.

    ``J(f) = sum over x, y of  integral (f_xx^2 + 2 f_xy^2 + f_yy^2) dx dy = 16 pi trace(W^T K W)``
    for the kernel ``U(r) = r^2 log r^2``, in normalised units. It is zero exactly when the map
    is affine and positive otherwise. Solves the TPS system on every call
    (:meth:`TPSGridGen.bending_energy` reuses one) and refuses non-finite source points.

    Args:
        source_points: ``(N, T, 2)``.
        target_points: ``(T, 2)``.

    Returns:
        ``(N,)`` energies, in the dtype of ``source_points`` (float32 under autocast).
    """
    return TPSGridGen(target_points, check_finite=True).to(source_points.device).bending_energy(source_points)
