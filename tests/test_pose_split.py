"""The split of the pose left into what follows the draw and what is each digit's own, against closed forms.

- :func:`split_spread` equals the sample variances computed by numpy, for angles across the +-180°
  wrap too, and a shift's coordinates add.
- The identity transformer leaves all of the drawn spread within digits, on a slope of 1.
- A transformer handed each image's exact inverse, turned by an angle of each digit's own, leaves
  nothing within digits and exactly that angle's spread between them.
- :func:`ink_slant` of a drawn stroke is its shear.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stn.callbacks import PoseSplit
from stn.data.distortions import dataset_params, digit_map
from stn.errors import SettingError
from stn.pose import to_digit
from stn.pose_split import ink_slant, pose_split, split_spread, within_slope
from stn.transformer import SpatialTransformer


def numpy_split(offsets: np.ndarray, noise: np.ndarray) -> tuple[float, float]:
    """Within: root mean per-digit variance (ddof 1); between: population variance of the means less within²/K."""
    draws = noise.shape[0]
    within_var = noise.var(axis=0, ddof=1).mean()
    means = offsets + noise.mean(axis=0)
    return math.sqrt(within_var), math.sqrt(max(means.var() - within_var / draws, 0.0))


def test_split_spread_is_the_within_and_between_digit_variance():
    generator = np.random.default_rng(0)
    offsets = generator.normal(0.0, 0.5, 200)
    noise = generator.normal(0.0, 0.2, (4, 200))
    split = split_spread(torch.from_numpy(offsets + noise))
    within, between = numpy_split(offsets, noise)
    assert float(split["within"]) == pytest.approx(within, rel=1e-12)
    assert float(split["between"]) == pytest.approx(between, rel=1e-12)


def test_split_spread_of_angles_reads_across_the_wrap():
    # symmetric draws about symmetric offsets: the mean directions are the arithmetic means, exactly
    offsets = np.linspace(-0.3, 0.3, 7)
    noise = np.array([[-0.1], [0.0], [0.1]]) * np.linspace(0.5, 1.5, 7)
    near_wrap = torch.from_numpy(np.angle(np.exp(1j * (math.pi - 0.05 + offsets + noise))))
    split = split_spread(near_wrap, circular=True)
    within, between = numpy_split(offsets, noise)
    assert float(split["within"]) == pytest.approx(within, rel=1e-9)
    assert float(split["between"]) == pytest.approx(between, rel=1e-9)


def test_a_shift_splits_into_the_sum_of_its_coordinates():
    generator = np.random.default_rng(1)
    shifts = generator.normal(0.0, 1.0, (3, 50, 2)) + generator.normal(0.0, 2.0, (1, 50, 2))
    both = split_spread(torch.from_numpy(shifts))
    x, y = (split_spread(torch.from_numpy(shifts[..., k])) for k in range(2))
    assert float(both["within"]) ** 2 == pytest.approx(float(x["within"]) ** 2 + float(y["within"]) ** 2, rel=1e-12)
    assert float(both["between"]) ** 2 == pytest.approx(float(x["between"]) ** 2 + float(y["between"]) ** 2, rel=1e-12)


def test_within_slope_is_the_share_of_the_draw_the_output_follows():
    drawn = torch.tensor([-0.2, 0.0, 0.2], dtype=torch.float64)[:, None] * torch.linspace(0.5, 2.0, 9) + torch.linspace(-0.4, 0.4, 9)
    offsets = torch.linspace(-0.5, 0.5, 9, dtype=torch.float64)
    assert float(within_slope(0.3 * drawn + offsets, drawn)) == pytest.approx(0.3, rel=1e-12)
    assert float(within_slope(drawn, drawn)) == pytest.approx(1.0, rel=1e-12)


def test_ink_slant_is_the_shear_of_a_stroke():
    images = torch.zeros(3, 1, 20, 20)
    rows = torch.arange(2, 18)
    images[0, 0, rows, 10] = 1.0  # upright
    images[1, 0, rows, rows] = 1.0  # one pixel right per pixel down
    images[2, 0, rows, 19 - rows] = 1.0  # one pixel left per pixel down: leaning right
    torch.testing.assert_close(ink_slant(images), torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))


def test_the_identity_leaves_the_whole_draw_within_digits():
    upright = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8)
    report = pose_split(SpatialTransformer("none"), upright, "rts", seeds=[1, 2, 3], batch_size=50)
    for name in ("angle", "log_scale", "shift"):
        assert report[f"{name}_within_left"] == pytest.approx(1.0, abs=1e-5)
    assert report["angle_within_slope"] == pytest.approx(1.0, abs=1e-5)
    assert 24 < report["angle_drawn"] < 29  # U(-45°, 45°)
    assert report["digits"] == 120 and report["draws"] == 3 and report["lost"] == 0
    drawn = np.degrees(np.abs(np.stack([dataset_params("rts", 120, seed)["angle"].numpy() for seed in (1, 2, 3)])))
    assert report["angle_abs_median"] == pytest.approx(report["angle_abs_median_drawn"], abs=1e-3)
    assert report["angle_abs_median_drawn"] == pytest.approx(np.median(drawn), abs=0.2)  # torch: the lower middle
    assert report["angle_over_30"] == pytest.approx((drawn > 30).mean(), abs=1e-9)


def test_the_split_per_class_is_the_split_of_that_class_alone():
    """labels: each class's within-digit shares read its digits alone, against the drawn spread of all; for
    the identity they are the spread of the drawn angles (about each digit's mean direction) and scales of
    that class (numpy, ddof 1)."""
    upright = torch.randint(0, 256, (90, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(90) % 3
    seeds = [4, 5, 6]
    report = pose_split(SpatialTransformer("none"), upright, "rts", seeds, batch_size=50, labels=labels)
    drawn = [dataset_params("rts", 90, seed) for seed in seeds]
    angles = np.stack([params["angle"].numpy() for params in drawn])  # (draws, digits)
    log_scales = np.stack([np.log(params["scale"].numpy()) for params in drawn])

    def within(values, digits, circular=False):
        values = values[:, digits]
        if not circular:
            return np.sqrt(values.var(0, ddof=1).mean())
        direction = np.angle(np.exp(1j * values).mean(0))  # each digit's mean direction
        deviations = np.angle(np.exp(1j * (values - direction)))
        return np.sqrt((deviations ** 2).sum(0).mean() / (values.shape[0] - 1))

    every = np.ones(90, dtype=bool)
    for label in (0, 1, 2):
        digits = (labels == label).numpy()
        assert report[f"class{label}/digits"] == 30
        assert report[f"class{label}/angle_within_slope"] == pytest.approx(1.0, abs=1e-5)
        assert report[f"class{label}/angle_within_left"] == pytest.approx(
            within(angles, digits, True) / within(angles, every, True), rel=1e-3)  # poses fitted in float32
        assert report[f"class{label}/log_scale_within_left"] == pytest.approx(
            within(log_scales, digits) / within(log_scales, every), rel=1e-3)
    # r draws no scale: no log-scale ratio per class either (as for the whole set)
    report = pose_split(SpatialTransformer("none"), upright, "r", seeds, batch_size=50, labels=labels)
    assert "log_scale_within_left" not in report and "class0/log_scale_within_left" not in report
    r_angles = np.stack([dataset_params("r", 90, seed)["angle"].numpy() for seed in seeds])
    assert report["class0/angle_within_left"] == pytest.approx(
        within(r_angles, (labels == 0).numpy(), True) / within(r_angles, every, True), rel=1e-3)


class InverseTurnedPerDigit(SpatialTransformer):
    """Reads each image at its distortion's exact inverse, turned by ``turns[n]``: the output of digit
    ``n`` shows it at one pose of its own, whatever the draw. Hands out one grid per call, in order."""

    def __init__(self, grids: list[torch.Tensor]):
        super().__init__("none")
        self.grids = list(grids)

    def localize(self, images: torch.Tensor) -> list[torch.Tensor]:
        return []

    def grid(self, params: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return self.grids.pop(0)


def test_a_pose_of_each_digits_own_is_all_between_and_none_within():
    count, seeds, size = 60, [4, 5, 6], (42, 42)
    turns = torch.linspace(-0.3, 0.3, count, dtype=torch.float64)  # symmetric: mean direction 0
    cos, sin = turns.cos()[:, None], turns.sin()[:, None]
    identity = torch.eye(2, 3, dtype=torch.float64)[None]
    points = F.affine_grid(identity, [1, 1, *size], align_corners=False).reshape(1, -1, 2).expand(count, -1, -1)
    turned = torch.stack([cos * points[..., 0] - sin * points[..., 1], sin * points[..., 0] + cos * points[..., 1]], -1)
    grids = []
    for seed in seeds:
        homography = digit_map("rts", dataset_params("rts", count, seed))["homography"]
        grid = to_digit(14 * turned, {"homography": torch.linalg.inv(homography)})
        grids.append(grid.reshape(count, *size, 2).float())
    upright = torch.zeros(count, 1, 28, 28, dtype=torch.uint8)
    rows = torch.arange(3, 25)
    upright[:, 0, rows, rows] = 255
    report = pose_split(InverseTurnedPerDigit(grids), upright, "rts", seeds, batch_size=count)
    assert report["angle_within"] < 1e-3 and report["log_scale_within"] < 1e-5 and report["shift_within"] < 1e-4
    assert report["angle_between"] == pytest.approx(math.degrees(turns.square().mean().sqrt()), rel=1e-4)
    assert report["log_scale_between"] < 1e-5 and report["shift_between"] < 1e-4
    assert abs(report["angle_within_slope"]) < 1e-4
    assert report["angle_over_30"] == 0  # every turn under 30°
    assert report["angle_abs_median"] == pytest.approx(math.degrees(float(turns.abs().median())), abs=0.05)
    # one stroke of slant 1 (45°) for every digit, shown turned by its own angle: slant cot(45° +- turn);
    # the stroke's width (a pixel, smeared by the bilinear read) pulls a moment's slant towards 0 by ~3 %
    expected = float((1 / torch.tan(math.pi / 4 + turns)).std())
    assert report["slant_upright"] == pytest.approx(0.0, abs=1e-9)
    assert report["slant_after"] == pytest.approx(expected, rel=0.05)


def test_split_spread_needs_two_draws():
    with pytest.raises(ValueError, match="at least 2 draws"):
        split_spread(torch.zeros(1, 5))


@pytest.mark.parametrize("settings", [{"digits": 1}, {"draws": 1}])
def test_the_pose_split_callback_names_its_setting_when_it_cannot_split(settings):
    with pytest.raises(SettingError, match=r"callbacks\.pose_split.*at least 2 of each"):
        PoseSplit(**settings)
