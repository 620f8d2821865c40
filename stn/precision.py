"""The precision a backbone runs in: ``auto`` is bfloat16 where the device computes it natively, else float32.

bfloat16 autocast makes a frozen backbone's dense convolutions two to three times faster on a CPU with
AVX512-BF16 or AMX and on a recent GPU, and about ten times slower where a CPU only emulates it (AVX2:
most laptops, cloud VMs and CI runners). So no recipe names bfloat16: it says ``auto``, resolved here per
device. ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` holds torch's and oneDNN's kernels to AVX2,
which shows a faster CPU what an AVX2-only one runs, and makes ``auto`` resolve to float32 there too.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from stn.errors import SettingError

__all__ = ["AUTO", "BACKBONE_DTYPES", "check_backbone_dtype", "cpu_name", "native_bfloat16", "resolve_backbone_dtype"]

AUTO = "auto"
BACKBONE_DTYPES = (AUTO, "float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic

CPUINFO = Path("/proc/cpuinfo")


def check_backbone_dtype(dtype: str, setting: str) -> str:
    """``dtype``, if a backbone can run in it; else a :class:`SettingError` naming ``setting``."""
    if dtype not in BACKBONE_DTYPES:
        raise SettingError(
            f"{setting}={dtype!r} is not a dtype a backbone can run in. Set it to auto (bfloat16 where the device "
            "computes it natively, else float32: the recipes' choice), float32 (the run's own precision), "
            "bfloat16 (autocast: dense convolutions 2-3x faster on CPUs with AVX512-BF16 or AMX and on recent "
            "GPUs, about 10x slower where a CPU emulates it) or float16."
        )
    return dtype


def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` (``flags``, ``model name``) for the first CPU in Linux ``/proc/cpuinfo``; ``None``
    where there is no such file or field."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in lines if line.startswith(field)), None)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is missing)."""
    return set((_cpuinfo("flags") or "").split())


def _onednn_allows_bfloat16() -> bool:
    """Whether oneDNN may use its bfloat16 kernels (``False`` under ``ONEDNN_MAX_CPU_ISA=AVX2``)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def cpu_name() -> str:
    """The CPU's model name, e.g. ``AMD EPYC`` (``platform.processor()`` where ``/proc/cpuinfo`` is missing)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether devices of ``device_type`` (``cpu``, ``cuda``, ...) compute bfloat16 natively.

    A CPU does when it has AVX512-BF16 or AMX and torch's and oneDNN's kernels may use them (torch's
    capability is AVX512, not held to AVX2 by ``ATEN_CPU_CAPABILITY``, and oneDNN is not held below by
    ``ONEDNN_MAX_CPU_ISA``); a CUDA device when it supports bfloat16 without emulation (Ampere or later).
    Cached per device type: call ``native_bfloat16.cache_clear()`` after faking either.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return (
            bool(_cpu_flags() & set(BF16_CPU_FLAGS))
            and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and _onednn_allows_bfloat16()
        )
    return False


def resolve_backbone_dtype(dtype: str, device: torch.device | str) -> str:
    """``dtype`` with ``auto`` resolved for ``device``: ``bfloat16`` where it is native, else ``float32``."""
    if dtype != AUTO:
        return dtype
    return "bfloat16" if native_bfloat16(torch.device(device).type) else "float32"
