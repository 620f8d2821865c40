"""Loc-net health: how much its predictions vary between images, and how many head units are dead.

A loc-net that collapses predicts one transform for every image: its parameters stop varying across a
batch, or every hidden ReLU of its head is zero on every image (dead units get no gradient, so they
never recover). Logged once per validation as curves, these show collapse and divergence as they
happen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stn.transformer import SpatialTransformer

__all__ = ["loc_net_health"]


@torch.no_grad()
def loc_net_health(transformer: SpatialTransformer, images: Tensor) -> list[dict[str, float]]:
    """Per stage of ``transformer``, on images ``(N, C, H, W)``:

    - ``param_std``: standard deviation over the images of each predicted parameter, averaged over the
      parameters (0: the same transform for every image);
    - ``dead_units``: share of the head's hidden units that are zero on every image (only for heads
      with a hidden layer).
    """
    hidden: dict[int, Tensor] = {}
    handles = [
        _hidden_relu(loc_net.head).register_forward_hook(
            lambda module, args, output, index=index: hidden.setdefault(index, output)
        )
        for index, loc_net in enumerate(transformer.loc_nets) if isinstance(loc_net.head, nn.Sequential)
    ]
    try:
        params = transformer.localize(images)
    finally:
        for handle in handles:
            handle.remove()
    report = []
    for index, stage_params in enumerate(params):
        health = {"param_std": float(stage_params.flatten(1).float().std(0).mean())}
        if index in hidden:
            health["dead_units"] = float((hidden[index] <= 0).all(0).float().mean())
        report.append(health)
    return report


def _hidden_relu(head: nn.Sequential) -> nn.ReLU:
    """The ReLU of a head ``Linear -> [LayerNorm ->] ReLU -> Linear``."""
    return next(module for module in head if isinstance(module, nn.ReLU))
