"""stn.tps against closed forms, an independent float64 reference and gradcheck."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import RBFInterpolator

from stn.tps import TPSGridGen, bending_energy, grid_points, tps_warp, warp_points

ALIGN = [False, True]


def random_sources(target: torch.Tensor, batch: int, scale: float = 0.15, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *target.shape, generator=generator, dtype=torch.float64)
    return (target.double() + scale * noise).to(dtype)


def pixel_centres(height: int, width: int, align_corners: bool) -> np.ndarray:
    """(H*W, 2) xy of pixel centres in grid_sample's frame, written out from its definition."""
    if align_corners:
        xs = np.array([2 * j / (width - 1) - 1 for j in range(width)])
        ys = np.array([2 * i / (height - 1) - 1 for i in range(height)])
    else:
        xs = np.array([(2 * j + 1) / width - 1 for j in range(width)])
        ys = np.array([(2 * i + 1) / height - 1 for i in range(height)])
    return np.array([[x, y] for y in ys for x in xs])


def test_grid_points_layout():
    points = grid_points(2, 3, margin=0.1)
    expected = torch.tensor(
        [[-0.9, -0.9], [0.0, -0.9], [0.9, -0.9], [-0.9, 0.9], [0.0, 0.9], [0.9, 0.9]]
    )
    assert points.shape == (6, 2) and points.dtype == torch.float32
    torch.testing.assert_close(points, expected)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("size", [(28, 28), (17, 23)])
def test_identity(align_corners, size):
    target = grid_points(4, 4)
    generator = TPSGridGen(target, size=size, align_corners=align_corners)
    grid = generator(target.expand(3, -1, -1))
    identity = F.affine_grid(torch.eye(2, 3).expand(3, -1, -1), [3, 1, *size], align_corners=align_corners)
    torch.testing.assert_close(grid, identity, atol=1e-5, rtol=0)

    image = torch.rand(3, 2, *size, generator=torch.Generator().manual_seed(1))
    warped = tps_warp(image, target.expand(3, -1, -1), target, align_corners=align_corners)
    torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_exact_interpolation(align_corners):
    target = grid_points(3, 4, margin=0.2)
    source = random_sources(target, 5, dtype=torch.float64)
    mapped = warp_points(target.double().expand(5, -1, -1), source, target)
    torch.testing.assert_close(mapped, source, atol=1e-10, rtol=0)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_exact_interpolation_on_grid_pixels(align_corners):
    """Control points placed on pixel centres are read exactly from their source points."""
    height, width = 9, 11
    centres = torch.from_numpy(pixel_centres(height, width, align_corners)).view(height, width, 2)
    rows, cols = [1, 4, 7], [2, 5, 9]
    target = torch.stack([centres[i, j] for i in rows for j in cols])
    source = random_sources(target, 2, dtype=torch.float64)
    grid = TPSGridGen(target, size=(height, width), align_corners=align_corners)(source)
    picked = torch.stack([grid[:, i, j] for i in rows for j in cols], dim=1)
    torch.testing.assert_close(picked, source, atol=1e-10, rtol=0)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_affine_reproduction(align_corners):
    target = grid_points(4, 4, margin=0.1)
    generator = torch.Generator().manual_seed(2)
    matrix = torch.eye(2) + 0.3 * torch.randn(4, 2, 2, generator=generator)
    shift = 0.2 * torch.randn(4, 1, 2, generator=generator)
    source = target @ matrix.transpose(1, 2) + shift
    theta = torch.cat([matrix, shift.transpose(1, 2)], dim=2)
    grid = TPSGridGen(target, size=(20, 30), align_corners=align_corners)(source)
    expected = F.affine_grid(theta, [4, 1, 20, 30], align_corners=align_corners)
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_matches_independent_float64_reference(align_corners):
    """Per-sample TPS interpolant from scipy's RBFInterpolator (r^2 log r kernel, linear part)."""
    height, width = 13, 19
    target = grid_points(4, 5, margin=0.15)
    source = random_sources(target, 3, dtype=torch.float64)
    grid = TPSGridGen(target, size=(height, width), align_corners=align_corners)(source)
    assert grid.dtype == torch.float64
    query = pixel_centres(height, width, align_corners)
    for n in range(3):
        spline = RBFInterpolator(target.double().numpy(), source[n].numpy(), kernel="thin_plate_spline", degree=1)
        expected = torch.from_numpy(spline(query)).view(height, width, 2)
        torch.testing.assert_close(grid[n], expected, atol=1e-6, rtol=0)


def test_output_size_is_built_and_cached():
    target = grid_points(4, 4)
    generator = TPSGridGen(target, size=(28, 28))
    source = random_sources(target, 2)
    grid = generator(source, size=(42, 42))
    fresh = TPSGridGen(target, size=(42, 42))(source)
    assert grid.shape == (2, 42, 42, 2)
    torch.testing.assert_close(grid, fresh)
    assert generator.map_matrix((42, 42)) is generator.map_matrix((42, 42))


@pytest.mark.parametrize("align_corners", ALIGN)
def test_gradcheck_grid(align_corners):
    target = grid_points(2, 3, margin=0.1)
    generator = TPSGridGen(target, size=(5, 7), align_corners=align_corners)
    source = random_sources(target, 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(generator, (source,))


@pytest.mark.parametrize("align_corners", ALIGN)
def test_gradcheck_tps_warp(align_corners):
    target = grid_points(2, 2, margin=0.2)
    source = random_sources(target, 2, scale=0.1, seed=3, dtype=torch.float64).requires_grad_()
    image = torch.rand(2, 2, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    image.requires_grad_()

    def warp(image, source):
        return tps_warp(image, source, target, size=(4, 5), align_corners=align_corners)

    assert torch.autograd.gradcheck(warp, (image, source))


@pytest.mark.parametrize("align_corners", ALIGN)
def test_warp_points_matches_grid_at_pixel_centres(align_corners):
    height, width = 8, 10
    target = grid_points(3, 3)
    source = random_sources(target, 2)
    grid = TPSGridGen(target, size=(height, width), align_corners=align_corners)(source)
    centres = torch.from_numpy(pixel_centres(height, width, align_corners)).float().expand(2, -1, -1)
    mapped = warp_points(centres, source, target)
    torch.testing.assert_close(mapped.view(2, height, width, 2), grid, atol=1e-5, rtol=0)


def test_bending_energy_zero_for_affine_positive_otherwise():
    target = grid_points(4, 4).double()
    matrix = torch.tensor([[1.2, 0.3], [-0.1, 0.8]], dtype=torch.float64)
    affine = (target @ matrix.T + torch.tensor([0.1, -0.2], dtype=torch.float64))[None]
    assert bending_energy(affine, target).abs().item() < 1e-10
    energy = bending_energy(random_sources(target, 4, dtype=torch.float64), target)
    assert energy.shape == (4,) and bool((energy > 1e-3).all())


def test_bending_energy_is_the_integral():
    """Closed form 16 pi tr(W^T K W) against a numerical integral of the second derivatives."""
    target = grid_points(3, 3).double()
    source = random_sources(target, 1, scale=0.1, dtype=torch.float64)
    count = target.shape[0]
    system = torch.zeros(count + 3, count + 3, dtype=torch.float64)
    r2 = torch.cdist(target, target).square()
    system[:count, :count] = torch.where(r2 > 0, r2 * torch.log(r2.clamp_min(1e-300)), 0.0)
    system[:count, count] = 1
    system[:count, count + 1 :] = target
    system[count:, :count] = system[:count, count:].T
    rhs = torch.cat([source[0], torch.zeros(3, 2, dtype=torch.float64)])
    weights = torch.linalg.solve(system, rhs)[:count]

    half, steps = 20.0, 2000
    step = 2 * half / steps
    axis = -half + step * (torch.arange(steps, dtype=torch.float64) + 0.5)
    total = 0.0
    for rows in axis.split(250):
        x, y = torch.meshgrid(rows, axis, indexing="ij")
        dx, dy = x[..., None] - target[:, 0], y[..., None] - target[:, 1]
        dist2 = dx.square() + dy.square()
        uxx = 2 * torch.log(dist2) + 4 * dx.square() / dist2 + 2
        uyy = 2 * torch.log(dist2) + 4 * dy.square() / dist2 + 2
        uxy = 4 * dx * dy / dist2
        fxx, fyy, fxy = uxx @ weights, uyy @ weights, uxy @ weights
        total += float((fxx.square() + 2 * fxy.square() + fyy.square()).sum()) * step * step
    assert math.isclose(bending_energy(source, target).item(), total, rel_tol=5e-3)


def test_dtype_device_and_batch_sizes():
    target = grid_points(4, 4)
    generator = TPSGridGen(target, size=(10, 12))
    for batch in (1, 7):
        grid = generator(random_sources(target, batch))
        assert grid.shape == (batch, 10, 12, 2) and grid.dtype == torch.float32
    assert generator(random_sources(target, 2, dtype=torch.float64)).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert generator(random_sources(target, 2)).dtype == torch.float32
        assert bending_energy(random_sources(target, 2), target).dtype == torch.float32


def test_float64_precision_survives_module_casts():
    target = grid_points(3, 3)
    source = random_sources(target, 2, dtype=torch.float64)
    reference = TPSGridGen(target, size=(6, 6))(source)
    generator = TPSGridGen(target, size=(6, 6)).float().double()
    torch.testing.assert_close(generator(source), reference, atol=1e-12, rtol=0)


def test_buffers_follow_the_module_and_are_not_checkpointed():
    generator = TPSGridGen(grid_points(3, 3), size=(5, 5))
    assert generator.state_dict() == {}
    assert {name for name, _ in generator.named_buffers()} == {"target_points", "matrix"}


@pytest.mark.parametrize(
    "points, message",
    [
        (torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "at least 3"),
        (torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), "coincide"),
        (torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0], [-1.0, -1.0]]), "one line"),
        (torch.zeros(4, 3), r"shape \(T, 2\)"),
        (torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, float("nan")]]), "NaN"),
    ],
)
def test_bad_target_points(points, message):
    with pytest.raises(ValueError, match=message):
        TPSGridGen(points, size=(8, 8))


@pytest.mark.parametrize("rows, cols, margin", [(1, 4, 0.0), (4, 1, 0.0), (3, 3, 1.0), (3, 3, -0.1)])
def test_impossible_layout(rows, cols, margin):
    with pytest.raises(ValueError, match="model.tps"):
        grid_points(rows, cols, margin)


def test_bad_source_points_and_images():
    target = grid_points(3, 3)
    generator = TPSGridGen(target, size=(8, 8))
    with pytest.raises(ValueError, match=r"\(N, 9, 2\)"):
        generator(torch.zeros(2, 8, 2))
    with pytest.raises(ValueError, match=r"\(N, 9, 2\)"):
        generator(torch.zeros(9, 2))
    bad = target.expand(2, -1, -1).clone()
    bad[1, 3, 0] = float("inf")
    grid = generator(bad)  # a forward pass never reads values back: the infinity reaches image 1's grid
    assert torch.isfinite(grid[0]).all() and not torch.isfinite(grid[1]).all()
    for refuses in (TPSGridGen(target, size=(8, 8), check_finite=True),
                    lambda points: tps_warp(torch.rand(2, 1, 8, 8), points, target),
                    lambda points: warp_points(target.expand(2, -1, -1), points, target),
                    lambda points: bending_energy(points, target)):
        with pytest.raises(ValueError, match="NaN or infinity"):
            refuses(bad)
    with pytest.raises(ValueError, match="batch size"):
        tps_warp(torch.rand(3, 1, 8, 8), target.expand(2, -1, -1), target)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        tps_warp(torch.rand(8, 8), target.expand(1, -1, -1), target)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        TPSGridGen(target, size=(0, 8))
