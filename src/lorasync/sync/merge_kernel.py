"""How W + scale * L @ R is computed into a destination tensor: the merge kernels, and the choice
between them, made by measurement once per machine and kept.

- `Kernel.ADDMM`: one fused `torch.addmm` in W's dtype, written straight into the destination.
  Fastest where the CPU multiplies in bf16/fp16 natively (AVX-512 BF16, AMX) and on GPUs.
- `Kernel.BLOCKED`: L @ R in float32 a block of rows at a time into a small scratch buffer,
  then one fused add-and-cast of W's rows into the destination's rows. Without native
  low-precision GEMM (an AVX2 CPU) torch's bf16 `addmm` falls back to a kernel about 20-80x
  slower than this (measured: 92 ms against 8.8 ms for a 4864x896 weight at rank 16 on an AMD
  EPYC with AVX2); the float32 product is also exact to float32 and rounds once, where
  PEFT's merge rounds the delta to bf16 before adding it.

Both give `merge_and_unload`'s value to the dtype's rounding (`tests/sync/test_merge.py`), but
not the same bytes: in bf16 they round differently. So that the weights a server serves do not
depend on how busy the machine was when a process started, the choice is made once per machine
and kept (issue #25): `choose` times both on a weight of a typical shape the first time a
(dtype, device type, thread count) is merged on a machine, keeps the faster in
`$LORASYNC_CACHE/merge-kernel.json` (default ~/.cache/lorasync) beside the machine's description
(`lorasync.machine.describe()`, the dtype and the device type), and every later process on that
machine reads it instead of timing. A file that cannot be read, or whose entry describes another
machine (another CPU, ISA cap, torch version or thread count), is measured again and rewritten;
where the cache folder cannot be written the choice is measured in the process, with a warning.
Neither kernel is assumed from the ISA; `$LORASYNC_MERGE_KERNEL` (addmm | blocked-float32) pins
one without timing, and `choose(forced=...)` forces one for a single caller. The sync report
and `bench sync` name the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Literal

import torch

from lorasync import machine
from lorasync.machine import cache_dir

log = logging.getLogger(__name__)

PIN_ENV = "LORASYNC_MERGE_KERNEL"  # addmm | blocked-float32: this kernel, never timed
CACHE_FILE = "merge-kernel.json"  # under `machine.cache_dir()`


class Kernel(str, Enum):
    ADDMM = "addmm"
    BLOCKED = "blocked-float32"

    @classmethod
    def parse(cls, value: str | Kernel | None) -> Kernel | None:
        """A kernel by name; None or "auto" for the one chosen on this machine (`choose`)."""
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


# Where a choice came from: `forced` by the caller, `pinned` by $LORASYNC_MERGE_KERNEL, `fixed`
# where there is nothing to choose (float32, a GPU), `measured` here, `cached` from this machine's
# earlier measurement (the cache file).
Source = Literal["forced", "pinned", "fixed", "measured", "cached"]


@dataclass(frozen=True)
class Choice:
    """The kernel that merges, what each candidate took on the probe weight (s) when it was
    measured (by this process or, `cached`, an earlier one on this machine; {} when not
    measured), and where the choice came from."""

    kernel: Kernel
    seconds: dict[str, float]
    source: Source


# A weight of the 0.5B model's MLP shape, at a typical rank: large enough that the time is
# the kernel's, small enough that measuring both costs ~0.1 s even where bf16 GEMM is slow.
PROBE_SHAPE, PROBE_RANK = (2432, 896), 16
_chosen: dict[tuple, Choice] = {}  # this process's choices, by (dtype, device type, threads)


def choose(dtype: torch.dtype, device: torch.device | str = "cpu", forced: Kernel | str | None = None) -> Choice:
    """The kernel to merge `dtype` weights on `device` with: `forced`, else the one pinned by
    $LORASYNC_MERGE_KERNEL, else addmm where there is nothing to choose (float32, not a CPU),
    else this machine's choice for (dtype, device type, thread count): read from the cache
    file, or measured once and written there."""
    forced = Kernel.parse(forced)
    if forced is not None:
        return Choice(forced, {}, "forced")
    pinned = _pinned()
    if pinned is not None:
        return Choice(pinned, {}, "pinned")
    device = torch.device(device)
    if device.type != "cpu" or dtype == torch.float32:
        # float32 addmm is already the float32 product; accelerators multiply bf16 natively
        return Choice(Kernel.ADDMM, {}, "fixed")
    key = (dtype, device.type, torch.get_num_threads())
    if key not in _chosen:
        _chosen[key] = _kept_choice(dtype, device.type)
    return _chosen[key]


def cache_file() -> Path:
    """Where each machine's choices are kept: $LORASYNC_CACHE/merge-kernel.json."""
    return cache_dir() / CACHE_FILE


def _pinned() -> Kernel | None:
    """The kernel $LORASYNC_MERGE_KERNEL names (None when it is unset, empty or "auto")."""
    value = os.environ.get(PIN_ENV, "")
    try:
        return Kernel.parse(value or None)
    except ValueError:
        choices = ", ".join(["auto", *(k.value for k in Kernel)])
        raise ValueError(
            f"{PIN_ENV} must be one of {choices}, got {value!r}: set one of those, or unset it "
            "for the kernel chosen once on this machine"
        ) from None


def _description(dtype: torch.dtype, device_type: str) -> dict:
    """What a kept choice holds for: the machine (CPU, ISA, caps, threads, torch), the dtype and
    the device type. An entry with any of these different is another machine's."""
    return machine.describe() | {"dtype": str(dtype).removeprefix("torch."), "device": device_type}


def _kept_choice(dtype: torch.dtype, device_type: str) -> Choice:
    """This machine's choice from the cache file, or measured now and written there. Holds an
    exclusive lock on the file's `.lock` while it reads, measures and writes, so that processes
    started together measure once and agree. Never raises for the file: an unreadable one or
    another machine's entry is measured again; an unwritable folder measures here, warning."""
    described = _description(dtype, device_type)
    path = cache_file()
    unwritable: OSError | None = None
    lock: IO | None = None
    try:
        lock = _lock(path)
    except OSError as err:
        unwritable = err
    try:
        entries = _read(path)
        for entry in entries:
            if entry["machine"] == described:
                return Choice(Kernel(entry["kernel"]), dict(entry["seconds"]), "cached")
        seconds = _time(dtype)
        choice = Choice(Kernel(min(seconds, key=seconds.get)), seconds, "measured")
        if unwritable is None:
            entry = {"machine": described, "kernel": choice.kernel.value, "seconds": seconds}
            try:
                _write(path, [e for e in entries if e["machine"] != described] + [entry])
            except OSError as err:
                unwritable = err
        if unwritable is not None:
            log.warning(
                "merge kernel %s measured in this process only: cannot write %s (%s), so another "
                "process may measure the other kernel and merge to other bf16 bytes; make the folder "
                "writable, set LORASYNC_CACHE to a writable one, or pin the kernel with %s=%s",
                choice.kernel.value, path, unwritable, PIN_ENV, choice.kernel.value,
            )
        return choice
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _lock(path: Path) -> IO:
    """An open `path.lock`, exclusively locked (closing it unlocks); OSError where the folder
    cannot be made or written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:
        lock.close()
        raise
    return lock


def _read(path: Path) -> list[dict]:
    """The well-formed entries of the cache file: none when it is missing, unreadable or not
    this module's JSON (it is rewritten after the next measurement)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []
    kernels = {k.value for k in Kernel}
    return [
        e for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("machine"), dict)
        and e.get("kernel") in kernels
        and isinstance(e.get("seconds"), dict)
        and all(isinstance(v, (int, float)) for v in e["seconds"].values())
    ]


def _write(path: Path, entries: list[dict]) -> None:
    """The cache file holding `entries`, replaced whole (a temporary file in the same folder,
    then `os.replace`): a reader sees the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": entries}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
