"""The weight-level verdict: does the engine hold, tensor by tensor, what the sync meant it to?

After a sync, every tensor the engine can read back (`base.WeightReader`: its parameters under
checkpoint names, linear weights read through their kernels) is compared, in the engine's dtype,
with the value the trainer's policy gives it (`merge.Merger`, the same code streaming sends):

- **exact**, bit for bit, where lorasync computed the bytes the engine loaded: `streaming`
  (the merged values themselves), `adapter` (the engine's base weights stay the checkpoint's;
  the factors live in vLLM's LoRA manager and are the logprob verdict's to judge), and an
  engine no sync has touched (version 0: the checkpoint);
- **within the merge's rounding** where another kernel merged: `merge-unmerge` (PEFT's in-place
  merge) and `factors` (the server's kernel). Each side rounds W + s * B @ A once into the dtype,
  possibly from factors rounded to it, so two right merges differ per element by at most
  `ROUNDING_ULPS` units in the last place of the value plus `FACTOR_ROUNDING` of the size of
  the delta's terms, |s| * |B| @ |A| (`bound`). A stale LoRA tensor moves its weights by the
  change since its last sync, seen where that change exceeds this rounding.

This level has no noise: the bound is the arithmetic's, not a measured spread, so it never
false-alarms, and it sees one stale tensor of any size in any dtype, as long as the delta
exceeds the dtype's rounding. What it cannot see: tensors no read-back rule names (counted in
`unread`), and in `adapter` the factors vLLM's LoRA manager holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass

import torch

from lorasync.served_model import TIED_HEAD
from lorasync.sync.base import Strategy, WeightReader
from lorasync.sync.merged_weight import MergedWeight
from lorasync.sync.plan import Entry, Source

# Two right merges of W + s * B @ A into a dtype differ by at most this many ulps of the value
# (one rounding each) ...
ROUNDING_ULPS = 2
# ... plus this fraction of |s| * |B| @ |A| (the delta's terms, which may cancel: a rounded
# product is off by a fraction of its terms' size, not of its own). Each side may round the
# factors, the product and the scale into the dtype (4 * 2^-8 in bf16): 2^-5 for both.
FACTOR_ROUNDING = 2.0**-5

# Strategies whose loaded bytes lorasync computed itself: judged bit for bit.
EXACT = frozenset({Strategy.STREAMING, Strategy.ADAPTER})


@dataclass(frozen=True)
class WeightCheck:
    """What the weight-level verdict compared and found."""

    tensors: int  # tensors compared
    mismatches: int  # tensors out of bound
    max_abs_diff: float  # the largest |engine - expected| of any element
    first_mismatch: str | None  # the first tensor out of bound, in the engine's order
    first_mismatch_diff: float  # its largest |difference|
    exact: bool  # judged bit for bit (else within the merge's rounding)
    unread: int  # served tensors the engine does not show (see readback.py)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.tensors > 0

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}

    def describe(self) -> str:
        """One line for a log or a warning."""
        how = "bit for bit" if self.exact else "within the merge's rounding"
        if self.ok:
            return f"weights: {self.tensors} tensors match {how}"
        return (
            f"weights: {self.mismatches} of {self.tensors} tensors differ ({how} expected); first "
            f"{self.first_mismatch}, by up to {self.first_mismatch_diff:.3g}"
        )


def bound(expected: torch.Tensor, terms: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per element, how far a right merge made by another kernel may be from `expected`, given
    the size of the delta's terms (None: nothing merged, so nothing rounded)."""
    tol = ROUNDING_ULPS * torch.finfo(dtype).eps * expected.abs() + torch.finfo(dtype).tiny
    if terms is not None:
        tol = tol + FACTOR_ROUNDING * terms
    return tol


class Expected:
    """The value the engine should hold for each checkpoint tensor, after a sync by `strategy`
    (None: no sync yet, the checkpoint's), in `dtype`: the policy's merged value, or for
    `adapter` the frozen base. With, where a merge made it, the size of the delta's terms
    (float32) that `bound` needs."""

    def __init__(self, merger, entries: tuple[Entry, ...], strategy: Strategy | None, dtype: torch.dtype) -> None:
        self.merger, self.dtype = merger, dtype
        self.entries = {e.checkpoint: e for e in entries}
        self.merged = strategy not in (None, Strategy.ADAPTER)

    def __contains__(self, name: str) -> bool:
        return name.removeprefix(TIED_HEAD) in self.entries

    @torch.no_grad()
    def __call__(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        entry = self.entries[name.removeprefix(TIED_HEAD)]
        base = _base(self.merger, entry)
        if not self.merged:
            return base.to(self.dtype), None
        value = self.merger(entry)  # what streaming sends: a MergedWeight is merged on reading
        value = (value.materialize() if isinstance(value, MergedWeight) else value).to(self.dtype)
        if entry.source is Source.PARAM:
            return value, None
        factors = self.merger.factors(entry)
        if factors is None:  # merged by PEFT's own arithmetic: the delta's own size
            return value, (value.float() - base.float()).abs()
        left, right, scale = factors
        return value, abs(scale) * (left.float().abs() @ right.float().abs())


def _base(merger, entry: Entry) -> torch.Tensor:
    """The frozen base value of an entry (what the checkpoint holds)."""
    found = merger.find(entry)
    if entry.source is Source.PARAM:
        return found.detach()
    base = found.get_base_layer() if entry.source is not Source.TOKENS else found.base_layer
    return (base.bias if entry.source is Source.LORA_BIAS else base.weight).detach()


def compare(
    read_back: Callable[[Callable[[str, torch.Tensor], None]], None],
    expected: Expected,
    exact: bool,
    served: int,
) -> WeightCheck:
    """Run the engine's read-back, comparing each tensor with `expected` as it arrives."""
    start = time.perf_counter()
    seen: set[str] = set()
    found = {"tensors": 0, "mismatches": 0, "max": 0.0, "first": None, "first_diff": 0.0}

    def visit(name: str, actual: torch.Tensor) -> None:
        if name not in expected:
            return
        want, delta = expected(name)
        seen.add(name.removeprefix(TIED_HEAD))
        found["tensors"] += 1
        if actual.shape != want.shape:
            diff, bad = float("inf"), True
        else:
            gap = (actual.float() - want.float()).abs()
            diff = gap.max().item() if gap.numel() else 0.0
            if exact:
                bad = not torch.equal(actual.to(want.dtype), want)
            else:
                bad = bool((gap > bound(want.float(), delta, expected.dtype)).any())
        found["max"] = max(found["max"], diff)
        if bad:
            found["mismatches"] += 1
            if found["first"] is None:
                found["first"], found["first_diff"] = name, diff

    read_back(visit)
    return WeightCheck(
        tensors=found["tensors"], mismatches=found["mismatches"], max_abs_diff=found["max"],
        first_mismatch=found["first"], first_mismatch_diff=found["first_diff"], exact=exact,
        unread=served - len(seen), seconds=time.perf_counter() - start,
    )


def check_weights(sync, only: Collection[str] | None = None) -> WeightCheck | None:
    """The weight-level verdict of `sync` (a `WeightSync`) on its engine, after its last sync
    (or none: the checkpoint's), on every tensor or those named in `only`. None when the engine
    cannot read its weights back (`WeightReader`)."""
    engine = sync.engine
    if not isinstance(engine, WeightReader):
        return None
    strategy = sync.last_strategy if engine.weight_version else None
    entries = sync.plan.full if only is None else tuple(e for e in sync.plan.full if e.checkpoint in only)
    expected = Expected(sync.merger, entries, strategy, engine.dtype)
    exact = strategy is None or strategy in EXACT
    return compare(lambda visit: engine.read_back(visit, only), expected, exact, len(entries))


def rotating_slice(sync, check: int, slices: int) -> list[str] | None:
    """The checkpoint names the `check`-th weight check reads (from 0) when each reads 1/`slices`
    of the engine's tensors, so that every tensor is read over `slices` checks: slice
    `check % slices` of the groups a sync changes and of the others, whole fused groups each.
    A slice of the changed groups is never empty, so any check sees a sync that changed nothing.
    None (everything) for the first check and for one slice."""
    if check == 0 or slices <= 1:
        return None
    changed = {e.checkpoint for e in sync.plan.changed}
    groups = [list(g) for g in sync.engine.weight_groups()]
    names: list[str] = []
    for part in ([g for g in groups if changed & set(g)], [g for g in groups if not changed & set(g)]):
        if part:
            for group in part[check % min(slices, len(part)) :: min(slices, len(part))]:
                names += group
    return names
