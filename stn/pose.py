"""How much of a distortion a spatial transformer leaves: compose, fit a similarity, measure the spread.

A transformer's sampling grid maps every output pixel to a position of the distorted image; the data
module's digit map (:func:`stn.data.distortions.digit_map`) maps that position back to the upright
digit. Composed, they say where each output pixel reads the original digit. Per image,
:func:`fit_similarity` fits the similarity ``q = s R(angle) p + t`` to that map, by least squares over
the output pixels that read inside the digit's own frame (:func:`frame_weights`; the 28x28 square of an
MNIST digit): what a transformer does to the empty canvas around the digit, e.g. a TPS bending its
border, says nothing about the digit's pose, and a projective map's far-away points would swamp the
fit. :class:`PoseSpread` accumulates, over an evaluation set, the spread of the fitted
angle (circular standard deviation, degrees), log-scale (standard deviation) and shift (rms distance
from the mean shift, digit pixels), and the non-similar residual (rms distance between the map and its
best similarity, digit pixels).

An output that reads (almost) none of the digit's frame, a transformer looking away from the digit, has
no pose to fit: such images are left out of the spreads and counted, as the share ``lost``.

A transformer that brings every digit into one pose leaves no spread; the identity transformer leaves
the spread the distortion put in. :func:`pose_report` gives both and their ratio (``*_left``: 1 = the
identity, 0 = every image in the same pose).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from stn.data.distortions import through_homography
from stn.tps import warp_points

__all__ = [
    "to_digit", "frame_weights", "fit_similarity", "PoseSpread", "AngleSlope", "pose_report", "SPREADS", "MIN_SPREAD",
    "DIGIT_HALF_SIZE", "MIN_READ",
]

DIGIT_HALF_SIZE = 14.0
"""Half the side of the digit frame, in digit pixels (28x28 MNIST): the pose fit reads inside it."""

SPREADS = ("angle", "log_scale", "shift", "residual")
"""The measured spreads, in degrees, natural-log units, digit pixels and digit pixels."""

MIN_SPREAD = {"angle": 0.5, "log_scale": 0.005, "shift": 0.05, "residual": 0.05}
"""Below this identity spread a distortion has none of that kind, and no ratio is reported."""

MIN_READ = 4
"""An output with fewer of its pixels inside the digit's frame shows none of the digit: it is ``lost``."""


def to_digit(points: Tensor, digit_map: dict[str, Tensor]) -> Tensor:
    """Positions ``(N, P, 2)`` of the distorted images -> where they show the upright digit ``(N, P, 2)``.

    Args:
        points: normalised xy of the distorted image (``grid_sample`` frame).
        digit_map: ``{"homography": (N, 3, 3)}`` or ``{"tps_source", "tps_target": (N, T, 2)}``, as
            :func:`stn.data.distortions.digit_map` returns.

    Returns:
        digit pixels from the digit's centre; NaN at positions on or beyond a homography's horizon,
        which show no point of the digit.
    """
    if "homography" in digit_map:
        return through_homography(points, digit_map["homography"].to(points.dtype))
    target = digit_map["tps_target"][0]
    return warp_points(points, digit_map["tps_source"].to(points.dtype), target)


def frame_weights(digit: Tensor, half_size: float = DIGIT_HALF_SIZE) -> Tensor:
    """``(N, P)`` weights: 1 where ``digit`` positions ``(N, P, 2)`` lie inside the digit's frame, else 0.

    The frame is the square of side ``2 * half_size`` digit pixels about the digit's centre (28x28 for
    MNIST): there the digit map is the distortion's own inverse, not its extrapolation (a homography
    extrapolated beyond the digit can pass its horizon, where positions go to infinity). An output
    with fewer than :data:`MIN_READ` positions inside shows none of the digit and has no pose to fit.
    """
    return (digit.abs() <= half_size).all(-1).to(digit.dtype)


def fit_similarity(points: Tensor, targets: Tensor, weights: Tensor | None = None) -> dict[str, Tensor]:
    """Weighted least-squares similarity ``targets ~ scale * R(angle) @ points + shift`` per image.

    Args:
        points: ``(N, P, 2)`` or ``(P, 2)`` positions it maps from.
        targets: ``(N, P, 2)`` positions it maps to.
        weights: ``(N, P)`` non-negative weights of the positions (``None``: 1 where ``targets`` are
            finite, 0 where they are NaN: past a homography's horizon, :func:`to_digit`).

    Returns:
        ``angle`` ``(N,)`` radians, ``log_scale`` ``(N,)``, ``shift`` ``(N, 2)`` (where the origin of
        ``points`` lands) and ``residual`` ``(N,)``: weighted rms distance between ``targets`` and the fit.
    """
    points = points.expand_as(targets)
    if weights is None:
        weights = targets.isfinite().all(-1).to(targets.dtype)
    targets = torch.where(weights[..., None] > 0, targets, 0.0)  # positions of no weight may be far off or NaN
    w = weights / weights.sum(1, keepdim=True)
    p = torch.complex(points[..., 0], points[..., 1])
    q = torch.complex(targets[..., 0], targets[..., 1])
    p_mean, q_mean = (w * p).sum(1, keepdim=True), (w * q).sum(1, keepdim=True)
    pc, qc = p - p_mean, q - q_mean
    a = (w * qc * pc.conj()).sum(1) / (w * pc.abs().square()).sum(1)
    b = q_mean[:, 0] - a * p_mean[:, 0]
    residual = (w * (q - (a[:, None] * p + b[:, None])).abs().square()).sum(1).sqrt()
    return {
        "angle": a.angle(),
        "log_scale": a.abs().log(),
        "shift": torch.stack([b.real, b.imag], dim=-1),
        "residual": residual,
    }


class PoseSpread(Metric):
    """Spread over a set of images of the similarities :func:`fit_similarity` returns.

    ``update(fit, keep)`` adds a batch, of which only the images where ``keep`` ``(N,)`` is true (all
    when ``None``) count; ``compute()`` returns ``{"angle": degrees, "log_scale", "shift": digit pixels,
    "residual": digit pixels, "lost": the share of images left out}``, the spreads NaN where every image
    was. The states are sums, so DDP ranks reduce exactly.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("count", "lost", "cos", "sin", "log", "log_sq", "shift_sq", "residual_sq"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("shift", default=torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fit: dict[str, Tensor], keep: Tensor | None = None) -> None:
        if keep is not None:
            self.lost += (~keep).sum()
            fit = {name: value[keep] for name, value in fit.items()}
        angle, log_scale = fit["angle"].double(), fit["log_scale"].double()
        shift, residual = fit["shift"].double(), fit["residual"].double()
        self.count += angle.numel()
        self.cos += angle.cos().sum()
        self.sin += angle.sin().sum()
        self.log += log_scale.sum()
        self.log_sq += log_scale.square().sum()
        self.shift += shift.sum(0)
        self.shift_sq += shift.square().sum()
        self.residual_sq += residual.square().sum()

    def compute(self) -> dict[str, Tensor]:
        count = self.count  # 0 when every image was lost: the spreads are NaN
        length = torch.hypot(self.cos, self.sin) / count
        mean_log = self.log / count
        mean_shift = self.shift / count
        return {
            "angle": torch.rad2deg(torch.sqrt(-2 * length.clamp(1e-12, 1.0).log())),
            "log_scale": (self.log_sq / count - mean_log.square()).clamp_min(0).sqrt(),
            "shift": (self.shift_sq / count - mean_shift.square().sum()).clamp_min(0).sqrt(),
            "residual": (self.residual_sq / count).sqrt(),
            "lost": self.lost / (self.count + self.lost).clamp_min(1),
        }


class AngleSlope(Metric):
    """Least-squares line of the angle after the transformer on the angle of the identity, over a set.

    ``update(after, identity)`` adds a batch of per-image angles ``(N,)`` (radians, as
    :func:`fit_similarity` returns them: the identity's is the angle the distortion drew); ``compute()``
    returns ``{"angle_slope", "angle_scatter"}``: the slope, and the rms distance of the angles after
    from that line, degrees. Angles are taken as they come, in ``(-pi, pi]``: a set whose angles after
    the transformer straddle +-180 degrees has no meaningful line.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("count", "x", "y", "xx", "xy", "yy"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, after: Tensor, identity: Tensor) -> None:
        y, x = after.double(), identity.double()
        self.count += x.numel()
        self.x += x.sum()
        self.y += y.sum()
        self.xx += x.square().sum()
        self.xy += (x * y).sum()
        self.yy += y.square().sum()

    def compute(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1)
        var_x = self.xx / count - (self.x / count).square()
        cov = self.xy / count - self.x * self.y / count.square()
        var_y = self.yy / count - (self.y / count).square()
        slope = cov / var_x
        return {"angle_slope": slope, "angle_scatter": torch.rad2deg((var_y - slope * cov).clamp_min(0).sqrt())}


def pose_report(after: dict[str, Tensor], identity: dict[str, Tensor]) -> dict[str, float]:
    """Scalars ``<spread>`` (after the transformer), ``<spread>_identity`` and ``<spread>_left`` (ratio),
    and ``lost``: the share of images whose output shows too little of the digit to have a pose.

    A ratio is left out where the identity spread is below :data:`MIN_SPREAD` (e.g. shift on ``r``,
    whose digits all stay centred), since there is nothing to undo.
    """
    report = {}
    for name in SPREADS:
        value, reference = float(after[name]), float(identity[name])
        report[name] = value
        report[f"{name}_identity"] = reference
        if math.isfinite(reference) and reference >= MIN_SPREAD[name]:
            report[f"{name}_left"] = value / reference
    report["lost"] = float(after["lost"])
    return report
