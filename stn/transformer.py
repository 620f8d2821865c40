"""Spatial transformer: localization network + grid generator + sampler.

``transform`` picks the grid generator:

- ``"tps"``: the loc-net predicts ``source_points`` ``(N, T, 2)`` for a ``rows`` x ``cols`` layout
  of target points, and :class:`~stn.tps.TPSGridGen` turns them into a sampling grid.
- ``"affine"``: the loc-net predicts ``theta`` ``(N, 2, 3)`` for :func:`F.affine_grid`.
- ``"none"``: no loc-net; the identity grid (a plain resample to ``output_size``), so a baseline
  classifier shares every other line of code with the STN.

All three start at the identity: an untrained transformer returns its input (resampled to
``output_size`` when that differs from the input size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stn.localization import LocalizationNet
from stn.tps import TPSGridGen, grid_points

__all__ = ["SpatialTransformer", "TRANSFORMS"]

TRANSFORMS = ("tps", "affine", "none")
IDENTITY_THETA = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


class SpatialTransformer(nn.Module):
    """Warp images with a transform predicted from the images themselves.

    Args:
        transform: ``"tps"``, ``"affine"`` or ``"none"``.
        loc_net: keyword arguments of :class:`~stn.localization.LocalizationNet` (not ``initial``).
        rows, cols, margin: the TPS target-point layout (:func:`~stn.tps.grid_points`); for
            ``affine`` and ``none`` the same layout is only used to draw control points.
        output_size: ``(H', W')`` of the warped image; ``None`` keeps the input size.
        align_corners: the ``affine_grid`` / ``grid_sample`` convention, used everywhere.
        padding_mode: ``grid_sample`` padding for reads outside the input.
    """

    def __init__(
        self,
        transform: str = "tps",
        loc_net: dict | None = None,
        rows: int = 4,
        cols: int = 4,
        margin: float = 0.0,
        output_size: tuple[int, int] | None = None,
        align_corners: bool = False,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(
                f"Unknown transform {transform!r}. Set model.transform to one of {', '.join(TRANSFORMS)}."
            )
        self.transform = transform
        self.output_size = None if output_size is None else (int(output_size[0]), int(output_size[1]))
        self.align_corners = bool(align_corners)
        self.padding_mode = padding_mode
        target = grid_points(rows, cols, margin)
        self.register_buffer("target_points", target, persistent=False)
        self.grid_gen = (
            TPSGridGen(target, size=self.output_size or (28, 28), align_corners=align_corners)
            if transform == "tps" else None
        )
        initial = {"tps": target, "affine": IDENTITY_THETA, "none": None}[transform]
        self.loc_net = None if initial is None else LocalizationNet(initial, **(loc_net or {}))

    def out_size(self, images: Tensor) -> tuple[int, int]:
        """``(H', W')`` of the warped version of ``images`` ``(N, C, H, W)``."""
        return self.output_size or (images.shape[-2], images.shape[-1])

    def localize(self, images: Tensor) -> Tensor | None:
        """Transform parameters for ``images`` ``(N, C, H, W)``.

        Returns:
            ``(N, T, 2)`` source points for ``tps``, ``(N, 2, 3)`` theta for ``affine``, ``None``
            for ``none``.
        """
        return None if self.loc_net is None else self.loc_net(images)

    def grid(self, params: Tensor | None, images: Tensor) -> Tensor:
        """Sampling grid ``(N, H', W', 2)`` in the input frame for ``params`` from :meth:`localize`."""
        size = self.out_size(images)
        batch = images.shape[0]
        if self.transform == "tps":
            return self.grid_gen(params, size=size)
        theta = params if self.transform == "affine" else IDENTITY_THETA.to(images).expand(batch, 2, 3)
        return F.affine_grid(theta, [batch, images.shape[1], *size], align_corners=self.align_corners)

    def control_points(self, params: Tensor | None, batch: int) -> Tensor:
        """Where the target-point layout is read from in the input frame, ``(N, T, 2)``.

        The predicted source points for ``tps``; the layout mapped through ``theta`` for
        ``affine``; the layout itself for ``none``.
        """
        target = self.target_points
        if self.transform == "tps":
            return params
        if self.transform == "affine":
            return target @ params[:, :, :2].transpose(1, 2) + params[:, None, :, 2]
        return target.expand(batch, -1, -1)

    def sample(self, images: Tensor, grid: Tensor) -> Tensor:
        """Read ``images`` ``(N, C, H, W)`` at ``grid`` ``(N, H', W', 2)`` -> ``(N, C, H', W')``."""
        return F.grid_sample(
            images, grid.to(images.dtype), mode="bilinear", padding_mode=self.padding_mode,
            align_corners=self.align_corners,
        )

    def forward(self, images: Tensor) -> Tensor:
        """Warped images ``(N, C, H', W')`` for ``images`` ``(N, C, H, W)``."""
        return self.sample(images, self.grid(self.localize(images), images))
