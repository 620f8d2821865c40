"""Which part of the pose a transformer leaves follows the distortion, and which is each digit's own.

:mod:`stn.pose` measures the spread, over a test set, of the pose of the transformer's output against
the upright MNIST digit. That spread mixes two things. A transformer that does not undo the distortion
leaves a pose that follows the drawn one. A transformer that undoes it but brings each digit into a
pose of its own, not the pose the digit has in MNIST (a slanted 1 turned upright, a small 0 zoomed to
fill the frame), leaves a pose that depends on the digit and not on the draw. Only the first is a
distortion left; the second is a canonical pose the transformer chose, which the class label has no
reason to make the MNIST one.

Distorting the same ``N`` digits ``K`` times, with independent draws, tells them apart. For each digit,
the spread of its pose over its ``K`` draws is what follows the distortion (``within``); the spread
over digits of each digit's mean pose is its own (``between``), less the share ``within^2 / K`` that the
draws leave in a mean of ``K`` (:func:`split_spread`). The identity transformer leaves ``within`` equal
to the spread of the drawn pose and nothing ``between``; a transformer that maps each digit to a fixed
pose of its own, whatever the draw, leaves nothing ``within``.

:func:`ink_slant` is the shear of a digit's ink, the handwriting's own slant: correlated with the
per-digit angle ``between`` (``angle_slant_r``), it says how much of that angle is the transformer
turning slanted digits upright.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stn.data.distortions import dataset_params, digit_map, distort_dataset
from stn.pose import MIN_READ, MIN_SPREAD, fit_similarity, frame_weights, to_digit
from stn.transformer import SpatialTransformer

__all__ = ["split_spread", "within_slope", "ink_slant", "draw_poses", "pose_split", "SPLIT_DISTORTIONS"]

SPLIT_SPREADS = ("angle", "log_scale", "shift")
UNITS = {"angle": math.degrees(1.0), "log_scale": 1.0, "shift": 1.0}
"""What each spread of the report is multiplied by: angles in degrees, log-scales as they are, shifts in
digit pixels."""
SPLIT_DISTORTIONS = ("r", "rts", "p", "e")
"""The distortions whose draws have a pose to split (each has a digit map)."""
TURNED_AWAY = 30.0
"""Degrees from upright beyond which :func:`pose_split` counts an output as turned away (``angle_over_30``)."""


def _wrap(angle: Tensor) -> Tensor:
    """Angles in radians wrapped into ``[-pi, pi)``."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def _per_digit(values: Tensor, circular: bool) -> tuple[Tensor, Tensor]:
    """Each digit's mean ``(N, ...)`` over the draws of ``values`` ``(K, N, ...)``, and the deviations from it.

    The mean of angles is their mean direction; deviations and means are wrapped, the means about the
    mean direction of them all.
    """
    if not circular:
        means = values.mean(0)
        return means - means.mean(0), values - means
    direction = torch.polar(torch.ones_like(values), values).mean(0).angle()
    overall = torch.polar(torch.ones_like(direction), direction).mean(0).angle()
    return _wrap(direction - overall), _wrap(values - direction)


def split_spread(values: Tensor, circular: bool = False) -> dict[str, Tensor]:
    """Split the spread of ``values`` ``(K, N)`` or ``(K, N, D)``, ``K >= 2`` draws of ``N`` digits.

    Args:
        values: per draw and digit a pose: an angle (radians, with ``circular``), a log-scale, or a
            shift ``(..., 2)`` (its coordinates' variances add).
        circular: the values are angles.

    Returns:
        ``within``: the root of the mean over digits of the variance over a digit's draws (``K - 1``
        degrees of freedom); ``between``: ``sqrt(max(v - within^2 / K, 0))``, ``v`` the variance over
        digits of their means, the root of what the digits differ by beyond the noise the draws leave
        in a mean of ``K``. Both in the units of ``values``.
    """
    draws = values.shape[0]
    if draws < 2:
        raise ValueError(f"split_spread needs at least 2 draws of each digit, got {draws}.")
    means, deviations = _per_digit(values.double(), circular)
    within_var = deviations.square().sum(0).mean(0) / (draws - 1)
    between_var = means.square().mean(0)
    if values.dim() == 3:
        within_var, between_var = within_var.sum(-1), between_var.sum(-1)
    return {"within": within_var.sqrt(), "between": (between_var - within_var / draws).clamp_min(0).sqrt()}


def within_slope(after: Tensor, drawn: Tensor) -> Tensor:
    """Least-squares slope of the angle after the transformer on the drawn angle, within digits.

    Args:
        after, drawn: ``(K, N)`` radians, the pose of ``K`` draws of ``N`` digits after the
            transformer and as drawn (the identity transformer's).

    Returns:
        ``()``: 1 for the identity, 0 for a transformer whose output pose does not follow the draw.
    """
    _, y = _per_digit(after.double(), circular=True)
    _, x = _per_digit(drawn.double(), circular=True)
    return (x * y).sum() / x.square().sum()


def ink_slant(images: Tensor) -> Tensor:
    """The slant of each image's ink: its shear ``cov(x, y) / var(y)`` over the pixels, ink-weighted.

    Args:
        images: ``(N, 1, H, W)`` or ``(N, H, W)``, non-negative ink.

    Returns:
        ``(N,)``: the x pixels the ink moves per pixel down the image (x right, y down); 0 for an
        upright stroke, negative for a digit leaning right.
    """
    ink = images.double().reshape(images.shape[0], images.shape[-2], images.shape[-1]).clamp_min(0)
    height, width = ink.shape[-2:]
    y, x = torch.meshgrid(
        torch.arange(height, dtype=ink.dtype), torch.arange(width, dtype=ink.dtype), indexing="ij"
    )
    mass = ink.sum((1, 2))
    dx = x - ((ink * x).sum((1, 2)) / mass)[:, None, None]
    dy = y - ((ink * y).sum((1, 2)) / mass)[:, None, None]
    return (ink * dx * dy).sum((1, 2)) / (ink * dy * dy).sum((1, 2))


@torch.no_grad()
def draw_poses(
    transformer: SpatialTransformer, upright: Tensor, distortion: str, seeds: Sequence[int], batch_size: int = 500
) -> dict[str, Tensor]:
    """Distort ``upright`` once per seed and fit each output's pose against the upright digit.

    Args:
        transformer: the trained transformer (in eval mode).
        upright: ``(N, 1, 28, 28)`` uint8 or float digits.
        distortion: a distortion with a digit map (``r``, ``rts``, ``p``, ``e``).
        seeds: one seed of :func:`~stn.data.distortions.distort_dataset` per draw.

    Returns:
        ``{"after": {...}, "identity": {...}}``, each ``{"angle", "log_scale": (K, N), "shift":
        (K, N, 2)}`` as :func:`~stn.pose.fit_similarity` returns them, ``"slant"`` ``(K, N)``: the
        :func:`ink_slant` of each output, and ``"kept"`` ``(N,)``: the digits whose output shows the
        digit on every draw (the spreads read only those).
    """
    device = next(iter(transformer.buffers())).device
    fits: dict[str, dict[str, list[Tensor]]] = {"after": {}, "identity": {}}
    kept = torch.ones(upright.shape[0], dtype=torch.bool)
    slants = []
    for seed in seeds:
        params = dataset_params(distortion, upright.shape[0], seed)
        images = distort_dataset(upright, distortion, seed, params)
        maps = {key: value.float() for key, value in digit_map(distortion, params).items()}
        draw: dict[str, dict[str, list[Tensor]]] = {"after": {}, "identity": {}}
        slant = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            batch_maps = {key: value[start : start + batch_size].to(device) for key, value in maps.items()}
            grids = {
                "after": transformer.grid(transformer.localize(batch), batch),
                "identity": transformer.compose([], transformer.out_size(batch), batch),
            }
            slant.append(ink_slant(transformer.sample(batch, grids["after"])).cpu())
            output = grids["identity"][:1].reshape(1, -1, 2).float()
            for which, grid in grids.items():
                digit = to_digit(grid.reshape(batch.shape[0], -1, 2).float(), batch_maps)
                weights = frame_weights(digit)
                if which == "after":
                    kept[start : start + batch_size] &= (weights.sum(1) >= MIN_READ).cpu()
                fit = fit_similarity(output, digit, weights)
                for name in SPLIT_SPREADS:
                    draw[which].setdefault(name, []).append(fit[name].cpu())
        for which in fits:
            for name, parts in draw[which].items():
                fits[which].setdefault(name, []).append(torch.cat(parts))
        slants.append(torch.cat(slant))
    poses = {which: {name: torch.stack(parts) for name, parts in fit.items()} for which, fit in fits.items()}
    return {**poses, "slant": torch.stack(slants), "kept": kept}


def pose_split(
    transformer: SpatialTransformer,
    upright: Tensor,
    distortion: str,
    seeds: Sequence[int],
    batch_size: int = 500,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """The spread of the pose left by ``transformer``, split into what follows the draw and what is the digit's.

    Args: as :func:`draw_poses`; at least 2 seeds.

    Returns:
        for each of ``angle`` (degrees), ``log_scale`` and ``shift`` (digit pixels): ``<spread>_within``
        and ``<spread>_between`` after the transformer (:func:`split_spread`), ``<spread>_drawn`` (the
        identity's ``within``: the spread the draws put in), and the ratios ``<spread>_within_left``
        (``within`` over ``drawn``: 1 for the identity, 0 for a transformer whose output pose does not
        follow the draw) and ``<spread>_between_left`` (``between`` over ``drawn``); ratios are left out
        where the draws put in less than :data:`~stn.pose.MIN_SPREAD`. Also ``angle_within_slope``
        (:func:`within_slope`), ``angle_slant_r`` (the correlation over digits of their mean angle
        after the transformer with their :func:`ink_slant`), ``slant_upright`` and ``slant_after`` (the
        standard deviation of the :func:`ink_slant` of the upright digits and of the transformer's
        outputs: below the upright's, the transformer straightens handwriting), ``digits`` (read),
        ``draws`` and ``lost`` (the share of digits left out because an output of theirs showed none of
        the digit). Robust to a few digits left far off, where a spread is not: ``angle_abs_median``
        (the median over digits and draws of the angle of the output from the upright digit, degrees),
        ``angle_abs_median_drawn`` (the same of the draws) and ``angle_over_30`` (the share of outputs
        turned more than :data:`TURNED_AWAY` degrees from upright). With ``labels`` ``(N,)``, also per
        class ``c`` present: ``class<c>/digits``, ``class<c>/angle_within_left``,
        ``class<c>/angle_within_slope`` and ``class<c>/log_scale_within_left`` (which digits the
        transformer leaves turned); a ratio is left out where the draws put in too little of that kind
        of spread, as above (the log-scale of ``r``).
    """
    if len(seeds) < 2:
        raise ValueError(f"pose_split needs at least 2 draws (seeds) of each digit, got {len(seeds)}.")
    poses = draw_poses(transformer, upright, distortion, seeds, batch_size)
    kept = poses["kept"]
    report: dict[str, float] = {
        "digits": float(kept.sum()), "draws": float(len(seeds)), "lost": 1.0 - float(kept.double().mean()),
    }
    if not kept.any():
        return report
    drawn: dict[str, float] = {}  # the spread each kind of pose was drawn with, in its raw units
    for name in SPLIT_SPREADS:
        after = split_spread(poses["after"][name][:, kept], circular=name == "angle")
        drawn[name] = float(split_spread(poses["identity"][name][:, kept], circular=name == "angle")["within"])
        report[f"{name}_drawn"] = drawn[name] * UNITS[name]
        for part in ("within", "between"):
            report[f"{name}_{part}"] = float(after[part]) * UNITS[name]
            if drawn[name] * UNITS[name] >= MIN_SPREAD[name]:
                report[f"{name}_{part}_left"] = float(after[part]) / drawn[name]
    angles = poses["after"]["angle"][:, kept]
    report["angle_within_slope"] = float(within_slope(angles, poses["identity"]["angle"][:, kept]))
    means, _ = _per_digit(angles.double(), circular=True)
    slant = ink_slant(upright[kept])
    report["angle_slant_r"] = float(torch.corrcoef(torch.stack([means, slant]))[0, 1])
    report["slant_upright"] = float(slant.std())
    report["slant_after"] = float(poses["slant"][:, kept].std())
    turns = {which: poses[which]["angle"][:, kept].abs() * UNITS["angle"] for which in ("after", "identity")}
    report["angle_abs_median"] = float(turns["after"].median())
    report["angle_abs_median_drawn"] = float(turns["identity"].median())
    report["angle_over_30"] = float((turns["after"] > TURNED_AWAY).double().mean())
    if labels is not None:
        report.update(_per_class(poses, kept, labels, drawn))
    return report


def _per_class(poses: dict[str, Tensor], kept: Tensor, labels: Tensor, drawn: dict[str, float]) -> dict[str, float]:
    """``class<c>/...`` of :func:`pose_split`: the within-digit shares over each class's digits alone, against
    the spread ``drawn`` over all digits."""
    report: dict[str, float] = {}
    shown = [name for name in ("angle", "log_scale") if drawn[name] * UNITS[name] >= MIN_SPREAD[name]]
    for label in labels[kept].unique().tolist():
        digits = kept & (labels == label)
        report[f"class{label}/digits"] = float(digits.sum())
        for name in shown:
            within = float(split_spread(poses["after"][name][:, digits], circular=name == "angle")["within"])
            report[f"class{label}/{name}_within_left"] = within / drawn[name]
        after, identity = poses["after"]["angle"][:, digits], poses["identity"]["angle"][:, digits]
        report[f"class{label}/angle_within_slope"] = float(within_slope(after, identity))
    return report
