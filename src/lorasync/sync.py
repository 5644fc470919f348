"""The sync: the small typed interface between the trainer's PeftModel and a generator engine.

The trainer side knows a `WeightReceiver` only: its dtype, the checkpoint layout its model was
built from and how that layout is grouped into fused parameters, and a call that loads
checkpoint-format tensors and returns the new weight version. Any engine (colocated vLLM now,
servers later) implements those.

Strategies:
- `streaming` (default): merged tensors are computed one at a time into temporaries and sent
  as they are made; the trainer model is never mutated. The first sync sends every tensor
  (the engine may start from another checkpoint), later ones only the changed groups.
- `merge-unmerge`: the known recipe, kept as the baseline: merge in place, send everything,
  unmerge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Protocol, TypeVar

import torch
from peft import PeftModel

from lorasync.merge import merged, merged_tensor
from lorasync.plan import Entry, SyncPlan, plan_sync

STRATEGIES = ("streaming", "merge-unmerge")
T = TypeVar("T")


class WeightReceiver(Protocol):
    """What the sync needs from an engine."""

    dtype: torch.dtype

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]: ...

    def weight_groups(self) -> Sequence[Sequence[str]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int: ...


@dataclass(frozen=True)
class SyncReport:
    """What one sync did."""

    strategy: str
    tensors_sent: int
    bytes_sent: int
    seconds: float
    version: int

    def to_dict(self) -> dict:
        return asdict(self)


def _one_ahead(make: Callable[[Entry], T], entries: Sequence[Entry]) -> Iterator[T]:
    """Yield make(entry) for each entry, computing the next one on a helper thread meanwhile.

    vLLM's CPU worker limits torch to one thread in this process, so the merge of the next
    tensor runs on the other core while the engine loads the current one. At most two merged
    tensors exist at a time (the one loading, the one being made).
    """
    if not entries:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasync-merge") as pool:
        pending = pool.submit(make, entries[0])
        for entry in entries[1:]:
            current, pending = pending, pool.submit(make, entry)
            yield current.result()
        yield pending.result()


class WeightSync:
    """Syncs a PeftModel's current policy into an engine; the plan is computed once."""

    def __init__(self, model: PeftModel, engine: WeightReceiver, strategy: str = "streaming") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.model = model
        self.engine = engine
        self.strategy = strategy
        self.plan: SyncPlan = plan_sync(model, engine.checkpoint_layout(), engine.weight_groups())
        self.syncs = 0

    def __call__(self) -> SyncReport:
        """Send the current policy; return what was sent and the engine's new version."""
        start = time.perf_counter()
        sent = {"tensors": 0, "bytes": 0}
        dtype = self.engine.dtype

        def counted(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                sent["tensors"] += 1
                sent["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        with torch.no_grad():
            if self.strategy == "merge-unmerge":
                with merged(self.model):
                    version = self.engine.load_weights(
                        counted(
                            (e.checkpoint, self.model.get_parameter(e.param).to(dtype))
                            for e in self.plan.full
                        )
                    )
            else:
                entries = self.plan.changed if self.syncs else self.plan.full
                adapter = self.plan.adapter_name

                def make(entry: Entry) -> tuple[str, torch.Tensor]:
                    return entry.checkpoint, merged_tensor(self.model, entry, adapter).to(dtype)

                version = self.engine.load_weights(counted(_one_ahead(make, entries)))
        self.syncs += 1
        return SyncReport(
            strategy=self.strategy,
            tensors_sent=sent["tensors"],
            bytes_sent=sent["bytes"],
            seconds=time.perf_counter() - start,
            version=version,
        )
