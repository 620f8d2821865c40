"""Turned negatives: the classifier learns that a digit turned away from its pose is no digit it knows.

A classifier trained on upright handwriting reads digits turned by 15-20 degrees almost as well as
upright ones, so once the transformer has turned a digit to within that range the class loss stops
asking for more: the transformer turns digits about two thirds of the way back (``angle_slope`` about
0.36). Here the classifier also reads each image it is trained on turned by a random ``±U(min_angle,
max_angle)`` degrees and is trained to give that copy uniform class probabilities. It so learns to
accept only the pose it is shown, and a transformer that leaves a digit turned pays for it. The
copies are read from the input through the transformer's grid turned, with the gradient stopped
(:func:`turn_grid`): this trains the classifier only; the transformer learns from it through the
class loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from stn.transformer import similarity_theta

__all__ = ["turn_grid", "uniform_cross_entropy"]


def turn_grid(grid: Tensor, min_angle: float, max_angle: float) -> Tensor:
    """A sampling grid ``(N, H, W, 2)`` whose output is that of ``grid`` turned about its centre by
    ``±U(min_angle, max_angle)`` degrees (sign and size drawn from torch's global generator).

    Each output pixel reads ``grid`` at its position turned (bilinearly, exact for affine grids) and
    output pixels that turn out of the frame read outside the input (zeros). One resample of the
    input, as for the untouched output: a turned copy resampled a second time would be blurrier, and
    a classifier told to reject it could learn to reject blur instead of the turn. The turn is in
    normalised coordinates: a true rotation for square outputs.
    """
    batch, height, width = grid.shape[:3]
    size = torch.rand(batch, device=grid.device) * (max_angle - min_angle) + min_angle
    sign = torch.randint(0, 2, (batch,), device=grid.device) * 2 - 1
    angle = torch.deg2rad(sign * size).to(grid.dtype)
    zeros = torch.zeros_like(angle)
    theta = similarity_theta(torch.stack([angle, zeros, zeros, zeros], -1))
    turned = F.affine_grid(theta, [batch, 2, height, width], align_corners=False)
    read = F.grid_sample(grid.permute(0, 3, 1, 2), turned, mode="bilinear", padding_mode="border", align_corners=False)
    outside = (turned.abs() > 1).any(-1, keepdim=True)
    return torch.where(outside, torch.full_like(turned, 3.0), read.permute(0, 2, 3, 1))


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(N, K)`` against the uniform distribution, less its minimum
    ``log K``: 0 when every row gives all classes the same probability, ``> 0`` otherwise."""
    return (torch.logsumexp(logits, -1) - logits.mean(-1)).mean() - math.log(logits.shape[-1])
