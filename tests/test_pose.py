"""The pose measure against closed forms.

- Every digit map reproduces the positions the distortion's own sampling grid reads.
- For the identity transformer the fitted similarity of each image is the inverse of its drawn
  distortion, so the spreads equal spreads computed straight from the drawn parameters (numpy).
- A transformer handed the exact inverse of each image's distortion brings every digit into one pose:
  every spread is ~0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stn.data.distortions import (
    dataset_params,
    digit_map,
    elastic_grid,
    output_size,
    projective_grid,
    similarity_grid,
)
from stn.module import STNClassifier
from stn.pose import MIN_READ, MIN_SPREAD, AngleSlope, PoseSpread, fit_similarity, frame_weights, pose_report, to_digit

COUNT = 300


def base_points(size: tuple[int, int]) -> torch.Tensor:
    """Pixel centres of an image of ``size``, normalised xy, ``(1, H*W, 2)`` float64."""
    identity = torch.eye(2, 3, dtype=torch.float64)[None]
    return F.affine_grid(identity, [1, 1, *size], align_corners=False).reshape(1, -1, 2)


def distortion_grid(name: str, params: dict) -> torch.Tensor:
    if name in ("r", "rts"):
        angle = params["angle"]
        scale = params.get("scale", torch.ones_like(angle))
        shift = params.get("shift", angle.new_zeros(angle.shape[0], 2))
        return similarity_grid(angle, scale, shift, output_size(name)[0])
    if name == "p":
        return projective_grid(params["scale"], params["corner_shift"])
    return elastic_grid(params["scale"], params["point_shift"])


def spreads(fits: dict) -> dict:
    metric = PoseSpread()
    metric.update(fits)
    return {key: float(value) for key, value in metric.compute().items()}


def circular_std_degrees(angles: np.ndarray) -> float:
    length = np.abs(np.exp(1j * angles).mean())
    return math.degrees(math.sqrt(-2 * math.log(length)))


@pytest.mark.parametrize("name", ["r", "rts", "p", "e"])
def test_digit_map_reads_where_the_distortion_grid_reads(name):
    params = dataset_params(name, 40, seed=5)
    grid = distortion_grid(name, params)
    points = base_points(output_size(name)).expand(40, -1, -1)
    mapped = to_digit(points, digit_map(name, params)) / 14
    if name == "p":  # the grid reads outside the image (2) past the horizon (NaN in the map) and beyond ±2
        mapped = torch.where(mapped.isnan(), 2.0, mapped).clamp(-2, 2)
    torch.testing.assert_close(mapped, grid.reshape(40, -1, 2), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["r", "rts"])
def test_identity_spread_is_the_spread_of_the_drawn_similarity(name):
    params = dataset_params(name, COUNT, seed=1)
    points = base_points(output_size(name))
    fit = fit_similarity(points, to_digit(points.expand(COUNT, -1, -1), digit_map(name, params)))
    measured = spreads(fit)
    angle = params["angle"].numpy()
    scale = params.get("scale", torch.ones(COUNT, dtype=torch.float64)).numpy()
    shift = params.get("shift", torch.zeros(COUNT, 2, dtype=torch.float64)).numpy()
    # the output centre shows the digit at R(angle)^T (-shift) / scale
    centre = np.stack([-(np.cos(angle) * shift[:, 0] + np.sin(angle) * shift[:, 1]),
                       np.sin(angle) * shift[:, 0] - np.cos(angle) * shift[:, 1]], axis=1) / scale[:, None]
    assert measured["angle"] == pytest.approx(circular_std_degrees(angle), rel=1e-6)
    assert measured["log_scale"] == pytest.approx(np.log(scale).std(), abs=1e-6)
    assert measured["shift"] == pytest.approx(np.sqrt(((centre - centre.mean(0)) ** 2).sum(1).mean()), abs=1e-9)
    assert measured["residual"] < 1e-9  # a similarity is exactly a similarity
    if name == "rts":  # U(-45°, 45°), U(0.7, 1.2): the spreads of the benchmark
        assert 24 < measured["angle"] < 29 and 0.13 < measured["log_scale"] < 0.17


def inverse_grid(name: str, params: dict, count: int, size: tuple[int, int]) -> torch.Tensor:
    """Where in the distorted image each output pixel must read so that it shows digit pixel 14 * p.

    The exact inverse of the digit map at the output pixel centres: a matrix inverse for the
    homographies, Newton's method on the digit map for the elastic TPS.
    """
    maps = digit_map(name, params)
    goal = base_points(size).expand(count, -1, -1) * 14
    if "homography" in maps:
        return to_digit(goal, {"homography": torch.linalg.inv(maps["homography"])})
    points = goal / 14
    for _ in range(20):
        points = points.detach().requires_grad_(True)
        mapped = to_digit(points, maps)
        rows = [torch.autograd.grad(mapped[..., k].sum(), points, retain_graph=True)[0] for k in range(2)]
        jacobian = torch.stack(rows, dim=-2)  # (N, P, 2, 2)
        step = torch.linalg.solve(jacobian, (mapped - goal)[..., None])[..., 0]
        points = points - step
    return points.detach()


@pytest.mark.parametrize("name", ["r", "rts", "p", "e"])
def test_a_transformer_handed_the_exact_inverse_leaves_no_spread(name):
    params = dataset_params(name, COUNT, seed=2)
    size = (28, 28)
    grid = inverse_grid(name, params, COUNT, size)
    points = base_points(size)
    maps = digit_map(name, params)
    # Newton's method finds the elastic inverse for all but a few images whose spline folds near the
    # border; keep the images whose inverse is exact
    exact = (to_digit(grid, maps) - 14 * points).abs().amax((1, 2)) < 1e-9
    assert exact.float().mean() > 0.98
    grid, maps = grid[exact], {key: value[exact] for key, value in maps.items()}
    after = spreads(fit_similarity(points, to_digit(grid, maps)))
    identity = spreads(fit_similarity(points, to_digit(points.expand(len(grid), -1, -1), maps)))
    report = pose_report(after, identity)
    for spread in ("angle", "log_scale", "shift"):
        assert after[spread] < 1e-6, (spread, after)
        if identity[spread] >= MIN_SPREAD[spread]:
            assert report[f"{spread}_left"] < 1e-5
    if name in ("p", "e"):  # the non-similar part of the distortion is undone too
        assert after["residual"] < 1e-6 < MIN_SPREAD["residual"] < identity["residual"]


def test_pose_report_leaves_out_ratios_of_spreads_the_distortion_does_not_have():
    after = {"angle": 10.0, "log_scale": 0.0, "shift": 0.5, "residual": 0.2, "lost": 0.01}
    identity = {"angle": 50.0, "log_scale": 0.0, "shift": 0.0, "residual": 0.0, "lost": 0.01}
    report = pose_report(after, identity)
    assert report["angle_left"] == pytest.approx(0.2)
    assert "shift_left" not in report and "log_scale_left" not in report and "residual_left" not in report
    assert report["shift"] == 0.5 and report["shift_identity"] == 0.0
    assert report["lost"] == 0.01 and "lost_identity" not in report and "lost_left" not in report


def test_the_module_reports_ratio_one_for_an_identity_transformer():
    """The LightningModule's eval path: an untrained (identity) STN leaves the whole spread."""
    params = dataset_params("rts", 64, seed=3)
    maps = {key: value.float() for key, value in digit_map("rts", params).items()}
    model = STNClassifier(["similarity", "tps"], output_size=(28, 28),
                          loc_net={"backbone": "resnet18", "weights": None, "input_size": 16}).eval()
    images = torch.rand(64, 1, 42, 42)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    with torch.no_grad():
        model._eval_step((images, torch.zeros(64, dtype=torch.long), maps), "test", model.test_acc, model.test_loss)
    model._log_pose("test")
    for spread in ("angle", "log_scale", "shift"):
        assert logged[f"test/pose/{spread}_left"] == pytest.approx(1.0, abs=1e-4)
    assert logged["test/pose/angle_identity"] > 20
    # the angle after is the angle drawn: slope 1, nothing off the line
    assert logged["test/pose/angle_slope"] == pytest.approx(1.0, abs=1e-4)
    assert logged["test/pose/angle_scatter"] < 1e-2
    assert logged["test/pose/lost"] == 0.0


def test_the_module_reports_what_the_first_stages_alone_leave():
    """Two affine stages, one handed the exact inverse of each RTS image's distortion (the digit map's
    homography inverted: output pixel p reads where digit pixel 14 p lies), the other the identity. Either way
    the whole transformer leaves ~0; the first stage alone leaves ~0 when it holds the inverse and the whole
    spread (1) when it is the identity."""
    params = dataset_params("rts", 64, seed=3)
    maps = {key: value.float() for key, value in digit_map("rts", params).items()}
    model = STNClassifier(["affine", "affine"], output_size=(28, 28),
                          loc_net={"backbone": "resnet18", "weights": None, "input_size": 16}).eval()
    images = torch.rand(64, 1, 42, 42)
    to_digit_pixels = torch.diag(torch.tensor([14.0, 14.0, 1.0], dtype=torch.float64))
    inverse = torch.linalg.inv(maps["homography"].double()) @ to_digit_pixels
    inverse = inverse / inverse[:, 2:, 2:]
    assert inverse[:, 2, :2].abs().max() < 1e-9  # RTS is affine
    theta, identity = inverse[:, :2].float(), torch.eye(2, 3).expand(64, 2, 3)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    for stage_params, first_left in (([theta, identity], 0.0), ([identity, theta], 1.0)):
        grid = model.transformer.grid(stage_params, images)
        model._update_pose(images, stage_params, grid, maps, "test")
        model._log_pose("test")
        for spread in ("angle", "log_scale", "shift"):
            assert logged[f"test/pose/{spread}_left"] == pytest.approx(0.0, abs=1e-3)
            assert logged[f"test/pose/stage1/{spread}_left"] == pytest.approx(first_left, abs=1e-3)
    assert not any(name.startswith("test/pose/stage2") for name in logged)


def test_outputs_that_read_none_of_the_image_are_lost_and_left_out_of_the_spreads():
    """Half the outputs read the image through the identity grid, half look 100x zoomed out (no pixel
    inside the image): lost = 0.5, and the spreads are those of the first half alone."""
    params = dataset_params("p", 64, seed=4)
    maps = {key: value.float() for key, value in digit_map("p", params).items()}
    model = STNClassifier("affine", loc_net={"backbone": "resnet18", "weights": None, "input_size": 16}).eval()
    images = torch.rand(64, 1, 28, 28)
    identity = model.transformer.compose([], (28, 28), images)
    away = torch.cat([identity[:32], 100 * identity[32:] + 300])
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    model._update_pose(images, [], away, maps, "test")
    model._log_pose("test")
    half = {key: value[:32] for key, value in maps.items()}
    model._update_pose(images[:32], [], identity[:32], half, "val")
    model._log_pose("val")
    assert logged["test/pose/lost"] == 0.5 and logged["val/pose/lost"] == 0.0
    for spread in ("angle", "log_scale", "shift", "residual"):
        assert logged[f"test/pose/{spread}"] == pytest.approx(logged[f"val/pose/{spread}"], rel=1e-6)
        assert logged[f"test/pose/{spread}_identity"] == pytest.approx(logged[f"val/pose/{spread}"], rel=1e-6)
    model._update_pose(images, [], 100 * identity + 300, maps, "val")  # every output looks away
    model._log_pose("val")
    assert logged["val/pose/lost"] == 1.0 and math.isnan(logged["val/pose/angle"])


def test_angle_slope_is_the_least_squares_line_over_all_batches():
    """Two batches of angles after = drawn / 3 + offset + noise: the slope and scatter of one float64
    least-squares fit over both (numpy's polyfit), in degrees for the scatter."""
    generator = np.random.default_rng(0)
    drawn = generator.uniform(-np.pi / 4, np.pi / 4, 500)
    after = drawn / 3 + 0.1 + generator.normal(0.0, 0.2, 500)
    slope, offset = np.polyfit(drawn, after, 1)
    scatter = np.degrees(np.sqrt(np.mean((after - (slope * drawn + offset)) ** 2)))
    metric = AngleSlope()
    for part in (slice(0, 200), slice(200, 500)):
        metric.update(torch.from_numpy(after[part]).float(), torch.from_numpy(drawn[part]).float())
    result = metric.compute()
    assert float(result["angle_slope"]) == pytest.approx(slope, rel=1e-5)
    assert float(result["angle_scatter"]) == pytest.approx(scatter, rel=1e-4)
    assert 0.25 < slope < 0.42  # the noise moves the fit, not the test: it compares with the same data's fit
    metric.reset()
    metric.update(torch.zeros(4), torch.tensor([-0.3, -0.1, 0.2, 0.4]))  # every turn undone
    assert float(metric.compute()["angle_slope"]) == 0.0 and float(metric.compute()["angle_scatter"]) == 0.0


def test_the_fit_reads_only_inside_the_digit_frame():
    """A map that is an exact similarity wherever it reads the digit, and anything at all outside the
    digit's frame (a TPS bending the empty canvas), fits that similarity exactly."""
    points = base_points((28, 28)).expand(2, -1, -1)
    angle = torch.tensor([0.3, -0.5], dtype=torch.float64)
    rotation = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], 1)
    digit = 16 * points @ rotation.transpose(1, 2) + torch.tensor([1.0, -2.0], dtype=torch.float64)
    outside = (digit.abs() > 14).any(-1)
    bent = torch.where(outside[..., None], 100 + 40 * torch.rand_like(digit), digit)  # far outside the frame
    weights = frame_weights(bent)
    assert 0.3 < weights.mean() < 0.9
    fit = fit_similarity(points, bent, weights)
    torch.testing.assert_close(fit["angle"], angle)
    torch.testing.assert_close(fit["log_scale"], torch.full((2,), math.log(16.0), dtype=torch.float64))
    torch.testing.assert_close(fit["shift"], torch.tensor([[1.0, -2.0], [1.0, -2.0]], dtype=torch.float64))
    assert fit["residual"].max() < 1e-9
    assert fit_similarity(points, bent)["residual"].min() > 1  # unweighted, the bent border spoils it
    assert frame_weights(digit + 1000).sum() == 0  # looks away from the digit: nothing to fit (lost)


def test_the_fit_never_reads_the_digit_map_past_a_horizon():
    """The failure this guards (one `p` test image of 10k, a digit squashed into a sliver, set the test
    set's rms residual to 104 px against 2.3 px without it): outside the digit's frame a projective digit
    map meets its horizon, where positions go to infinity. The fit reads the frame alone: it equals the
    fit of the positions inside it."""
    points = base_points((28, 28))
    grid = 10 * points  # zoomed out 10x: a few of the 28x28 positions read the digit's frame
    homography = torch.tensor([[[14.0, 0.0, 0.0], [0.0, 14.0, 0.0], [0.11, 0.0, 1.0]]], dtype=torch.float64)
    digit = to_digit(grid, {"homography": homography})  # depth 1 + 0.11 x: a horizon at x = -9.1
    weights = frame_weights(digit)
    inside = weights.bool()
    assert MIN_READ <= int(inside.sum()) < 0.05 * inside.numel()
    assert bool((grid[inside].abs() < 1.2).all())  # the frame is the middle of the image (depth 0.87-1.13)
    fit = fit_similarity(points, digit, weights)
    alone = fit_similarity(points[inside][None], digit[inside][None])
    for key in ("angle", "log_scale", "shift", "residual"):
        torch.testing.assert_close(fit[key], alone[key])
    assert fit["residual"].item() < 1.0  # the homography is near-similar inside the frame
    assert fit_similarity(points, digit)["residual"].item() > 1e3  # unweighted: the horizon dominates
