"""The GPU path: the same model, data and checkpoints on CUDA as on the CPU.

Every test needs a CUDA device and is skipped without one (``pytest -m cuda`` selects them). The
CPU-side equivalents (channels-last, ``torch.compile``, bf16 autocast against the plain path) are in
``tests/test_model.py`` and run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from stn.data.distortions import distort_with_map, sample_params, warp
from stn.localization import LocalizationNet
from stn.module import STNClassifier
from stn.tps import TPSGridGen, grid_points
from test_train import read_metrics, retested_error, run_script

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CHEAP = {"backbone": "resnet18", "weights": None, "input_size": 16}


def test_tps_grid_on_cuda_equals_the_cpu_grid_and_its_cache_follows_the_module():
    torch.manual_seed(0)
    target = grid_points(4, 4)
    generator = TPSGridGen(target, size=(28, 28))
    source = target + 0.05 * torch.randn(3, 16, 2)
    on_cpu = generator(source)
    generator.cuda()
    on_cuda = generator(source.cuda())
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-5, rtol=0)
    other = generator(source.cuda(), size=(21, 21))  # another size builds its map on the device
    assert other.device.type == "cuda" and other.shape == (3, 21, 21, 2)


def test_training_distortions_drawn_on_cuda_carry_their_digit_maps():
    generator = torch.Generator(device="cuda").manual_seed(0)
    raw = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, device="cuda")
    images, maps = distort_with_map(raw, "rts", generator)
    assert images.device.type == "cuda" and images.shape == (8, 1, 42, 42)
    assert maps["homography"].device.type == "cuda"
    again = torch.Generator(device="cuda").manual_seed(0)
    torch.testing.assert_close(images, warp(raw, "rts", sample_params("rts", 8, again, torch.float32)))


def test_model_on_cuda_matches_the_cpu_and_keeps_the_grid_in_float32_under_bf16():
    torch.manual_seed(0)
    model = STNClassifier(["similarity", "tps"], loc_net=CHEAP, output_size=(28, 28)).eval()
    x = torch.rand(4, 1, 42, 42)
    on_cpu = model(x)
    model.cuda()
    torch.testing.assert_close(model(x.cuda()).cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        params = model.transformer.localize(x.cuda())
        grid = model.transformer.grid(params, x.cuda())
    assert grid.dtype == torch.float32


def test_a_bfloat16_backbone_on_cuda_reads_what_the_float32_one_reads():
    torch.manual_seed(0)
    net = LocalizationNet(torch.zeros(4), weights=None, feature_node="layer2", input_size=32, freeze_backbone=True)
    x = torch.rand(4, 1, 42, 42)
    reference = net.features(x)
    net.cuda().backbone_dtype = "bfloat16"
    rounded = net.features(x.cuda())
    assert rounded.dtype == torch.float32 and rounded.device.type == "cuda"
    assert float((rounded.cpu() - reference).norm() / reference.norm()) < 2e-2


@pytest.mark.mnist
@pytest.mark.slow
def test_a_gpu_run_with_bf16_writes_checkpoints_that_load_on_a_cpu(tmp_path, tiny_run):
    run, _ = run_script(
        "train.py", tmp_path, "gpu", "+experiment=mnist_tps", *tiny_run, "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed",
    )
    summary = read_metrics(run)
    # the best checkpoint re-tested on the GPU under bf16 autocast, in a plain loop over the run's 2 test batches
    expected = retested_error(summary["best_checkpoint"], summary["config"]["data"], 2, device="cuda", bf16=True)
    assert summary["metrics"]["test/error"] == pytest.approx(expected, abs=1e-6)
    model = STNClassifier.from_checkpoint(summary["last_checkpoint"])
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model(torch.rand(2, 1, 42, 42)).shape == (2, 10)
