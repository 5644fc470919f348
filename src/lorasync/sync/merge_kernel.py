"""How W + scale * L @ R is computed into a destination tensor: the merge kernels, and the choice
between them, made by measurement on the machine that merges.

- `Kernel.ADDMM`: one fused `torch.addmm` in W's dtype, written straight into the destination.
  Fastest where the CPU multiplies in bf16/fp16 natively (AVX-512 BF16, AMX) and on GPUs.
- `Kernel.BLOCKED`: L @ R in float32 a block of rows at a time into a small scratch buffer,
  then one fused add-and-cast of W's rows into the destination's rows. Without native
  low-precision GEMM (an AVX2 CPU) torch's bf16 `addmm` falls back to a kernel about 20-80x
  slower than this (measured: 92 ms against 8.8 ms for a 4864x896 weight at rank 16 on an AMD
  EPYC with AVX2); the float32 product is also exact to float32 and rounds once, where
  PEFT's merge rounds the delta to bf16 before adding it.

Both give `merge_and_unload`'s value to the dtype's rounding (`tests/sync/test_merge_kernel.py`).
Neither is assumed from the ISA: `choose` times both on a weight of a typical shape, once per
process for each (dtype, thread count), and the faster one merges; the sync report and
`bench sync` name it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import torch


class Kernel(str, Enum):
    ADDMM = "addmm"
    BLOCKED = "blocked-float32"

    @classmethod
    def parse(cls, value: str | Kernel | None) -> Kernel | None:
        """A kernel by name; None or "auto" for the measured choice."""
        if value is None or value == "auto":
            return None
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(["auto", *(k.value for k in cls)])
            raise ValueError(f"merge kernel must be one of {choices}, got {value!r}") from None


# Float32 elements of one block of the blocked kernel's product (1 MiB): L2-sized, so the rows
# are still in cache when they are added. Measured on a 4864x896 and an 896x4864 weight (AVX2
# emulated, 2 threads): 64-row blocks 2.6/1.7 ms, 256 rows 1.8/1.6 ms, 512 rows 1.8/2.3 ms.
BLOCK_ELEMENTS = 1 << 18


def merge_into(
    dest: torch.Tensor,
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    kernel: Kernel,
) -> torch.Tensor:
    """dest = weight + scale * left @ right (dest and weight of one shape and dtype; the factors
    in any floating dtype). Returns dest."""
    if kernel is Kernel.ADDMM:
        dtype = weight.dtype
        return torch.addmm(weight, left.to(dtype), right.to(dtype), alpha=scale, out=dest)
    left, right = left.float(), right.float()
    rows, cols = weight.shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    scratch = torch.empty((min(step, rows), cols), dtype=torch.float32, device=weight.device)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        product = torch.mm(left[start : start + n], right, out=scratch[:n])
        # float32 + float32 * scale, rounded once into dest's dtype
        torch.add(weight[start : start + n], product, alpha=scale, out=dest[start : start + n])
    return dest


@dataclass(frozen=True)
class Choice:
    """The kernel that merges, and what each candidate took on the probe weight (s)."""

    kernel: Kernel
    seconds: dict[str, float]
    measured: bool  # False when nothing needed measuring (float32, a GPU) or it was forced


# A weight of the 0.5B model's MLP shape, at a typical rank: large enough that the time is
# the kernel's, small enough that measuring both costs ~0.1 s even where bf16 GEMM is slow.
PROBE_SHAPE, PROBE_RANK = (2432, 896), 16
_chosen: dict[tuple, Choice] = {}


def choose(dtype: torch.dtype, device: torch.device | str = "cpu", forced: Kernel | str | None = None) -> Choice:
    """The kernel to merge `dtype` weights on `device` with: `forced`, or the faster one as
    measured here (cached per dtype, device and thread count)."""
    forced = Kernel.parse(forced)
    if forced is not None:
        return Choice(forced, {}, measured=False)
    device = torch.device(device)
    if device.type != "cpu" or dtype == torch.float32:
        # float32 addmm is already the float32 product; accelerators multiply bf16 natively
        return Choice(Kernel.ADDMM, {}, measured=False)
    key = (dtype, device.type, torch.get_num_threads())
    if key not in _chosen:
        seconds = _time(dtype)
        _chosen[key] = Choice(Kernel(min(seconds, key=seconds.get)), seconds, measured=True)
    return _chosen[key]


def _time(dtype: torch.dtype, rounds: int = 5) -> dict[str, float]:
    """Best seconds of each kernel on the probe weight, taking turns (one call of each per
    round) so that a busy machine slows both alike."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(PROBE_SHAPE, generator=generator).to(dtype)
    left = torch.randn(PROBE_SHAPE[0], PROBE_RANK, generator=generator)
    right = torch.randn(PROBE_RANK, PROBE_SHAPE[1], generator=generator)
    dest = torch.empty_like(weight)
    best = {k.value: float("inf") for k in Kernel}
    for round_ in range(rounds + 1):
        for kernel in Kernel:
            start = time.perf_counter()
            merge_into(dest, weight, left, right, 0.5, kernel)
            if round_:  # the first round warms up
                best[kernel.value] = min(best[kernel.value], time.perf_counter() - start)
    return best
