"""Equivariance of the first stage: an image turned and scaled by a known amount must be localised so.

A transformer that undoes the pose of a digit maps a turned copy of an image to the same output as the
image itself. With ``x'`` the image ``x`` read through a random similarity ``A`` (``x'(p) = x(A p)``), the
first stage's map ``g'`` of ``x'`` (output -> ``x'``) must then satisfy ``A g'(o) = g(o)`` for every
output point ``o``, where ``g`` is its map of ``x``. :func:`equivariance_error` measures how far it is
from that, relative to the spread of ``g`` itself: in absolute units a stage could meet it by zooming
into a point (a map of scale 0 is trivially equivariant; a first probe did exactly that, with the next
stage zooming back out), and a ratio leaves no such way out. It needs no label and no knowledge of the
data's own distortion (``A`` is drawn here); it only says that the first stage's prediction must move with the image, so the
class loss is left to choose one pose for all digits. A classifier that has learned to read turned
digits gives the transformer little reason to turn them (the curriculum fights that); this gives the
transformer a reason of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stn.transformer import SpatialTransformer, affine_points, similarity_theta

__all__ = ["random_similarity", "equivariance_error"]


def random_similarity(batch: int, max_angle: float, max_log_scale: float, device: torch.device | str) -> Tensor:
    """``(N, 2, 3)`` similarities about the image centre, angle ~ U(-max_angle, max_angle) degrees and
    log-scale ~ U(-max_log_scale, max_log_scale), drawn from torch's global generator."""
    draws = torch.rand(batch, 2, device=device) * 2 - 1
    zeros = torch.zeros(batch, 2, device=device)
    return similarity_theta(torch.cat([draws[:, :1] * math.radians(max_angle), draws[:, 1:] * max_log_scale, zeros], 1))


def equivariance_error(
    transformer: SpatialTransformer, images: Tensor, first_params: Tensor, max_angle: float, max_log_scale: float,
) -> Tensor:
    """Squared distance between the first stage's map of ``images`` and its map of a randomly turned and
    scaled copy carried back through that turn, relative to the spread of the map itself, per image.

    Args:
        transformer: the spatial transformer; its first stage is tested.
        images: ``(N, C, H, W)`` the batch.
        first_params: the first stage's parameters of ``images`` (``transformer.localize(images)[0]``).
        max_angle, max_log_scale: the range of the random similarity (degrees, natural-log units).

    Returns:
        a scalar: the mean over images of sum_o |A g'(o) - g(o)|^2 / sum_o |g(o) - mean g|^2 over the
        target points o (0: equivariant; at the identity, 1 + s^2 - 2 s cos a for a turn a and scale s).
    """
    stage = transformer.stages[0]
    theta = random_similarity(images.shape[0], max_angle, max_log_scale, images.device).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=transformer.align_corners)
    turned = transformer.sample(images, grid)
    points = transformer.target_points.to(images.dtype).expand(images.shape[0], -1, -1)
    expected = stage.map_points(first_params, points)
    carried = stage.map_points(stage.loc_net(turned), points)
    back = affine_points(theta, carried)
    spread = (expected - expected.mean(1, keepdim=True)).square().sum((1, 2))
    return ((back - expected).square().sum((1, 2)) / spread.clamp_min(1e-12)).mean()
