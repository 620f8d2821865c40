"""backbone_dtype=auto: bfloat16 where the device computes it natively, float32 elsewhere (stn.precision)."""

from __future__ import annotations

import logging

import pytest
import torch

from stn import precision
from stn.localization import LocalizationNet
from stn.precision import native_bfloat16, resolve_backbone_dtype
from stn.progress import StepClock, duration


@pytest.fixture
def fake_cpu(monkeypatch):
    """Fake the CPU's flags, torch's capability and oneDNN's permission; returns the setter."""

    def fake(flags: set[str], capability: str, onednn: bool) -> None:
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(precision, "_onednn_allows_bfloat16", lambda: onednn)
        native_bfloat16.cache_clear()

    yield fake
    native_bfloat16.cache_clear()


@pytest.mark.parametrize(("flags", "capability", "onednn", "expected"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", True, "bfloat16"),   # e.g. AMD Zen 4, Intel Cooper Lake
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "AVX512", True, "bfloat16"),  # Intel Sapphire Rapids
    ({"avx2", "avx512f"}, "AVX512", True, "float32"),                   # AVX-512 without BF16: emulated
    ({"avx2", "fma"}, "AVX2", False, "float32"),                        # a laptop or CI runner
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", True, "float32"),      # ATEN_CPU_CAPABILITY=avx2
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", False, "float32"),   # ONEDNN_MAX_CPU_ISA=AVX2
    (set(), "DEFAULT", False, "float32"),                               # no /proc/cpuinfo
])
def test_auto_resolves_to_bfloat16_only_where_the_cpu_computes_it_natively(fake_cpu, flags, capability, onednn, expected):
    fake_cpu(flags, capability, onednn)
    assert resolve_backbone_dtype("auto", "cpu") == expected
    assert resolve_backbone_dtype("float32", "cpu") == "float32" and resolve_backbone_dtype("bfloat16", "cpu") == "bfloat16"


def test_an_auto_loc_net_runs_its_backbone_in_the_resolved_dtype(fake_cpu):
    """The same images through an auto loc-net give the float32 or the bfloat16 loc-net's features exactly."""
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    nets = {}
    for dtype in ("auto", "float32", "bfloat16"):
        torch.manual_seed(0)
        nets[dtype] = LocalizationNet(torch.zeros(4), weights=None, feature_node="layer1", input_size=16,
                                      backbone_dtype=dtype).eval()
    with torch.no_grad():
        for native, twin in ((True, "bfloat16"), (False, "float32")):
            fake_cpu({"avx512_bf16"} if native else set(), "AVX512", True)
            assert torch.equal(nets["auto"].features(images), nets[twin].features(images))
        assert not torch.equal(nets["float32"].features(images), nets["bfloat16"].features(images))


def test_the_progress_clock_estimates_from_the_first_steps_and_counts_down(caplog):
    clock = StepClock("pose pretraining", 20, logging.getLogger("test"))
    with caplog.at_level(logging.INFO, logger="test"):
        for step in range(20):
            clock.step()
            if step % 10 == 9:
                clock.epoch(step // 10, 2, "rms error 0.5")
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("pose pretraining: 20 steps at ") and "a step on this machine" in lines[0]
    assert lines[1].startswith("pose pretraining: epoch 1/2, rms error 0.5;") and "left" in lines[1]
    assert lines[2].startswith("pose pretraining: epoch 2/2") and lines[2].endswith("about 0 s left")
    assert (duration(42), duration(425), duration(3725)) == ("42 s", "7 min 05 s", "1 h 02 min")
