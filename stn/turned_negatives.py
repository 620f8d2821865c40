"""Turned negatives: the classifier learns that a digit turned away from its pose is no digit it knows.

A classifier trained on upright handwriting reads digits turned by 15-20 degrees almost as well as
upright ones, so once the transformer has turned a digit to within that range the class loss stops
asking for more: the transformer turns digits about two thirds of the way back (``angle_slope`` about
0.36). Here the classifier also reads each image it is trained on turned by a random ``±U(min_angle,
max_angle)`` degrees and is trained to give that copy uniform class probabilities. It so learns to
accept only the pose it is shown, and a transformer that leaves a digit turned pays for it. The
copies are taken of the transformer's output with the gradient stopped: this trains the classifier
only; the transformer learns from it through the class loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["turn_away", "uniform_cross_entropy"]


def turn_away(images: Tensor, min_angle: float, max_angle: float) -> Tensor:
    """``images`` ``(N, C, H, W)``, each turned about its centre by ``±U(min_angle, max_angle)`` degrees
    (sign and size drawn from torch's global generator), zeros outside. The turn is in normalised
    coordinates: a true rotation for square images."""
    batch = images.shape[0]
    size = torch.rand(batch, device=images.device) * (max_angle - min_angle) + min_angle
    sign = torch.randint(0, 2, (batch,), device=images.device) * 2 - 1
    angle = torch.deg2rad(sign * size).to(images.dtype)
    cos, sin = angle.cos(), angle.sin()
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], -1), torch.stack([sin, cos, zeros], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(N, K)`` against the uniform distribution, less its minimum
    ``log K``: 0 when every row gives all classes the same probability, ``> 0`` otherwise."""
    return (torch.logsumexp(logits, -1) - logits.mean(-1)).mean() - math.log(logits.shape[-1])
