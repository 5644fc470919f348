"""The sync: the small typed interface between the trainer's PeftModel and a generator engine.

The trainer side knows a `WeightReceiver` only: its dtype, the checkpoint layout its model was
built from, and a call that loads checkpoint-format tensors and returns the new weight
version. Any engine (colocated vLLM now, servers later) implements those three things.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from peft import PeftModel

from lorasync.merge import merged
from lorasync.plan import SyncPlan, plan_full_sync


class WeightReceiver(Protocol):
    """What the sync needs from an engine."""

    dtype: torch.dtype

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int: ...


@dataclass(frozen=True)
class SyncReport:
    """What one sync did."""

    tensors_sent: int
    bytes_sent: int
    seconds: float
    version: int

    def to_dict(self) -> dict:
        return asdict(self)


class WeightSync:
    """Syncs a PeftModel's current policy into an engine; the plan is computed once."""

    def __init__(self, model: PeftModel, engine: WeightReceiver) -> None:
        self.model = model
        self.engine = engine
        self.plan: SyncPlan = plan_full_sync(model, engine.checkpoint_layout())

    def __call__(self) -> SyncReport:
        """Merge, send every planned tensor in the engine's dtype, unmerge."""
        start = time.perf_counter()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        sent = {"tensors": 0, "bytes": 0}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, ckpt in self.plan.entries:
                tensor = params[name].detach().to(self.engine.dtype)
                sent["tensors"] += 1
                sent["bytes"] += tensor.numel() * tensor.element_size()
                yield ckpt, tensor

        with torch.no_grad(), merged(self.model):
            version = self.engine.load_weights(stream())
        return SyncReport(
            tensors_sent=sent["tensors"],
            bytes_sent=sent["bytes"],
            seconds=time.perf_counter() - start,
            version=version,
        )
