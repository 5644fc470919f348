"""What machine a measurement ran on: benchmarks record it beside their numbers, because the
same code differs by 10x between CPUs with and without native bf16 matrix instructions; and
where this machine keeps what lorasync downloads, converts and measures (`cache_dir`)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

# CPU flags that decide how fast low-precision GEMM runs (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CACHE_ENV = "LORASYNC_CACHE"


def cache_dir() -> Path:
    """Where downloaded wheels, converted models and measured kernel choices live:
    $LORASYNC_CACHE, by default ~/.cache/lorasync."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorasync")


def describe() -> dict:
    """CPU model, the ISA torch dispatches to, the flags that matter, threads, versions."""
    flags = set(_cpuinfo("flags").split())
    return {
        "cpu_model": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        # set to emulate a smaller machine (e.g. ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
        "isa_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def float32_gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """A plain float32 square GEMM's rate here (best of `repeats`): the roofline a merge
    kernel's GFLOP/s is read against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return ""


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory afresh (Linux: `5` to /proc/self/clear_refs),
    so a benchmark can measure each of its sides; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started or `reset_peak_rss` (VmHWM);
    None off Linux."""
    return _status_bytes("VmHWM")


def rss_bytes() -> int | None:
    """This process's resident memory now (VmRSS); None off Linux."""
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None
