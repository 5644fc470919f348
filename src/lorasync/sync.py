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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from peft import PeftModel

from lorasync.merge import merged, merged_tensor
from lorasync.plan import SyncPlan, plan_sync

STRATEGIES = ("streaming", "merge-unmerge")


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

                # One merged temporary at a time: made, sent, dropped. (Merging the next one on
                # a helper thread was measured slower: torch already uses both cores here.)
                version = self.engine.load_weights(
                    counted(
                        (e.checkpoint, merged_tensor(self.model, e, adapter).to(dtype))
                        for e in entries
                    )
                )
        self.syncs += 1
        return SyncReport(
            strategy=self.strategy,
            tensors_sent=sent["tensors"],
            bytes_sent=sent["bytes"],
            seconds=time.perf_counter() - start,
            version=version,
        )
