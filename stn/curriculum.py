"""Which networks learn in which training epoch.

``freeze_classifier`` holds the classifier fixed inside an epoch range, so that only the transformer
can lower the loss. ``stage_start`` lets each transformer stage's loc-net learn from an epoch of its
own: before it the stage keeps its initial map (the identity for a fresh loc-net, whose last layer
starts at zero), so that a later stage (a TPS) joins once the stages before it have learned the pose.
:func:`check_epoch_range` reads such a range (``model.freeze_classifier``, ``model.oracle_pose``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from stn.errors import SettingError

__all__ = ["check_epoch_range", "check_stage_start", "hold"]


def check_epoch_range(epochs: Sequence[float] | None, setting: str, meaning: str) -> tuple[float, float] | None:
    """``epochs`` as ``(first, end)``, the training epochs ``first <= epoch < end``; ``None`` stays ``None``.

    Args:
        setting: the config key, for the error (``model.freeze_classifier``).
        meaning: what happens in those epochs, for the error (``the classifier is frozen``).
    """
    if epochs is None:
        return None
    if (
        isinstance(epochs, (str, bool)) or not isinstance(epochs, Sequence) or len(epochs) != 2
        or not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in epochs)
        or not 0 <= epochs[0] <= epochs[1]
    ):
        raise SettingError(
            f"{setting} must be null or [first, end], the training epochs first <= epoch < end in which {meaning} "
            f"(0 <= first <= end), got {epochs!r}. Set e.g. {setting}=[1,3]."
        )
    return float(epochs[0]), float(epochs[1])


def check_stage_start(starts: Sequence[int] | None, stages: int) -> tuple[int, ...] | None:
    """``model.stage_start``: one training epoch per stage from which its loc-net learns."""
    if starts is None:
        return None
    if (
        isinstance(starts, str) or len(starts) != stages
        or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in starts)
    ):
        raise SettingError(
            f"model.stage_start must be null or one epoch per stage of model.transform ({stages} here), each an "
            f"integer >= 0 from which that stage's loc-net learns (before it the stage keeps its initial map), "
            f"got {starts!r}. Set e.g. model.stage_start=[0,5] for [similarity,tps], or null: every stage from "
            "epoch 0."
        )
    return tuple(starts)


def hold(network: nn.Module, held: bool) -> None:
    """Hold ``network`` fixed (no gradients; batch norm and dropout in evaluation mode) or let it learn.

    Called every training step (Lightning puts the whole module back into training mode each epoch).
    A network let go gets its gradients back (a :class:`~stn.localization.LocalizationNet` with
    ``freeze_backbone`` keeps its backbone frozen).
    """
    if held:
        network.requires_grad_(False)
        network.eval()
    elif not any(p.requires_grad for p in network.parameters()):
        network.requires_grad_(True)
        network.train()
