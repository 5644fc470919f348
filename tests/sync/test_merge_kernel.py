"""The merge kernel is chosen by measurement on the machine that merges, never by assumption.
(That each kernel gives `merge_and_unload`'s value: tests/sync/test_merge.py and
tests/sync/test_merged_weight.py, parametrized over both.)"""

import subprocess
import sys

import pytest
import torch

from lorasync.sync import merge_kernel
from lorasync.sync.merge_kernel import Kernel, choose, merge_into


@pytest.fixture
def timings(monkeypatch):
    """Set what each kernel is measured to take; the choice cache starts empty."""
    measured: dict[Kernel, float] = {}
    monkeypatch.setattr(merge_kernel, "_chosen", {})
    monkeypatch.setattr(merge_kernel, "_time", lambda dtype: {k.value: v for k, v in measured.items()})
    return measured


@pytest.mark.parametrize("fast", list(Kernel))
def test_low_precision_on_cpu_takes_the_faster_kernel_as_measured(timings, fast):
    for kernel in Kernel:
        timings[kernel] = 0.001 if kernel is fast else 0.05
    choice = choose(torch.bfloat16)
    assert choice.kernel is fast and choice.measured
    assert choice.seconds == {k.value: timings[k] for k in Kernel}
    timings[fast] = 1.0  # measured once per process: a second engine reuses the choice
    assert choose(torch.bfloat16).kernel is fast


def test_float32_and_forced_kernels_are_not_measured(timings):
    assert choose(torch.float32) == merge_kernel.Choice(Kernel.ADDMM, {}, measured=False)
    assert choose(torch.bfloat16, forced="blocked-float32").kernel is Kernel.BLOCKED
    with pytest.raises(ValueError, match="auto, addmm, blocked-float32, got 'fast'"):
        choose(torch.bfloat16, forced="fast")


def test_blocked_kernel_spans_blocks_and_rounds_once(monkeypatch):
    """Rows beyond one block, a ragged last block, float32 factors for a bf16 weight."""
    monkeypatch.setattr(merge_kernel, "BLOCK_ELEMENTS", 3 * 8)  # 3 rows of 8 per block
    weight = torch.randn(10, 8).to(torch.bfloat16)
    left, right = torch.randn(10, 2), torch.randn(2, 8)
    dest = merge_into(torch.empty_like(weight), weight, left, right, 0.5, Kernel.BLOCKED)
    assert torch.equal(dest, torch.add(weight.float(), left @ right, alpha=0.5).to(torch.bfloat16))


EMULATED_AVX2 = """
import torch
from lorasync.sync.merge_kernel import choose
choice = choose(torch.bfloat16)
print(torch.backends.cpu.get_cpu_capability(), choice.kernel.value, choice.seconds)
"""


def test_without_native_bf16_gemm_the_blocked_kernel_wins():
    """On a CPU without native bf16 GEMM (AVX2, emulated here by capping torch's and oneDNN's
    ISA) torch's bf16 addmm is 10-80x slower than the blocked float32 kernel; the measured
    choice must see it. This is the machine kind where streaming was slower than the recipe.
    (Up to three fresh processes: another job on both cores once slowed the blocked kernel's
    many small parallel regions more than addmm's one.)"""
    env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "PATH": "/usr/bin:/bin"}
    outs = []
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", EMULATED_AVX2], env=env, capture_output=True, text=True, check=True
        ).stdout
        capability, kernel, seconds = out.split(" ", 2)
        assert capability == "AVX2", out
        outs.append(out)
        if kernel == "blocked-float32":
            return
    raise AssertionError(f"addmm chosen without native bf16 GEMM: {outs}")
