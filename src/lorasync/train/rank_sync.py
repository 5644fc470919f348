"""The sync on N ranks: who gathers what, and who sends.

Under FSDP2 the parameters a sync reads are gathered with `full_tensor()` on all ranks
together: the trainable ones before anyone sends (`gathered`: a factor or adapter sync, and
checkpoints), or, for a merged sync, tensor by tensor as the engine takes them, every rank
running the same stream (`Gathering`); a rank interleaving its gathers with rank 0's send is
the hang of TRL #7103. Colocated, each rank syncs its own engine; into shared servers only rank
0 sends, and no rank goes on before it is done (a barrier on the version, `sync_policy`).
`train/generation.py` wires these together for the trainer.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

from lorasync.sync.base import Strategy
from lorasync.sync.weight_sync import WeightSync
from lorasync.train.distributed import Dist, broadcast_object, failures

# the strategies that merge on the trainer: under FSDP2 they read the frozen base weights too,
# gathered one tensor at a time as the engine takes them (`Gathering`)
MERGED = (Strategy.STREAMING, Strategy.MERGE_UNMERGE)


@contextlib.contextmanager
def gathered(model: torch.nn.Module, d: Dist, tally: Gathering | None = None) -> Iterator[None]:
    """Under FSDP2: inside, the model's trainable parameters (LoRA factors, `modules_to_save`)
    are whole tensors, gathered by `full_tensor()` on every rank, all before the block runs
    (so rank 0's send never interleaves with another rank's gather: TRL #7103). What a factor
    or adapter sync or a checkpoint reads; the frozen base stays sharded. `tally` counts their
    bytes as held for the block. Outside FSDP2, nothing to do."""
    if not (d.active and d.mode == "fsdp2"):
        yield
        return
    from torch.distributed.tensor import DTensor

    swapped, whole = [], {}
    with failures(d, "gathering the sharded parameters"):
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and param.requires_grad:
                    # hand-written: FSDP2's own unshard() gathers whole units, base included.
                    # A tied parameter is gathered once, and stays tied.
                    if id(param) not in whole:
                        whole[id(param)] = torch.nn.Parameter(param.full_tensor(), requires_grad=True)
                    module._parameters[name] = whole[id(param)]
                    swapped.append((module, name, param))
    size = sum(t.numel() * t.element_size() for t in whole.values())
    if tally is not None:
        tally.held(size)
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        if tally is not None:
            tally.freed(size)


class Gathering:
    """How a sync's tensor streams reach the engine under FSDP2 (`WeightSync(load_weights=...)`).
    Each tensor the engine takes (or each part of a lazy `MergedWeight`: base weight and
    factors) is gathered with `full_tensor()` as the engine asks for it, so a rank holds the
    whole of one tensor at a time, never the whole model: the merged strategies' base
    weights, merged (`merge-unmerge`: PEFT's merge, on the shards) or not. Every rank runs the
    same sync, so the gathers run in the same order on all; on ranks that do not send
    (`sends=False`: ranks > 0 into shared servers) the gathered tensors are dropped.
    `peak_bytes`: the most bytes of gathered tensors alive at once since `gathering_metrics`
    last read it. It is not an engine: the sync keeps the engine itself for everything else."""

    def __init__(self, engine, d: Dist, sends: bool = True) -> None:
        self.engine, self.d, self.sends = engine, d, sends
        self.live = self.peak_bytes = 0

    def load_weights(self, weights) -> int:
        with failures(self.d, "gathering a tensor for the sync"):
            stream = weights.map(self._whole)  # a WeightStream: a server's manifest reads its names
            if self.sends:
                return self.engine.load_weights(stream)
            for _ in stream:
                pass
            return self.engine.weight_version

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        from lorasync.sync.merged_weight import MergedWeight

        if isinstance(tensor, MergedWeight):
            w, left, right = (self._whole(t) for t in (tensor.weight, tensor.left, tensor.right))
            return MergedWeight(w, left, right, tensor.scale, tensor.kernel)
        if not isinstance(tensor, DTensor):
            return tensor
        whole = tensor.full_tensor()
        self.held(size := whole.numel() * whole.element_size())
        weakref.finalize(whole, self.freed, size)  # when the engine is done with it
        return whole

    def held(self, size: int) -> None:
        self.live += size
        self.peak_bytes = max(self.peak_bytes, self.live)

    def freed(self, size: int) -> None:
        self.live -= size


def gathering(engine, d: Dist, shared: bool) -> Gathering | None:
    """Under FSDP2, what the sync's streams go through (`WeightSync(load_weights=...)`):
    rank 0 alone sends into shared servers. None otherwise: straight to the engine."""
    if d.active and d.mode == "fsdp2":
        return Gathering(engine, d, sends=d.main or not shared)
    return None


def sync_policy(sync: WeightSync, d: Dist, shared: bool, tally: Gathering | None = None):
    """One sync of the policy on every rank: returns the `SyncReport` (rank 0's when shared).

    Colocated (`shared=False`), each rank syncs its own engine: the policy is the same on all
    ranks after the gradient all-reduce. Into shared servers rank 0 sends; the others wait at
    a barrier and receive its report, so no rank generates before the new version is served.
    Under FSDP2 a factor or adapter sync (or `auto`'s choice) reads the trainable parameters,
    gathered first (`gathered`); a merged sync runs on every rank, its streams through
    `Gathering` (`tally`, which counts the gathered bytes), each base weight gathered as it is
    sent."""
    merged = sync.strategy in MERGED
    runs = d.main or not shared or (merged and d.mode == "fsdp2")
    with contextlib.nullcontext() if merged else gathered(sync.model, d, tally):
        report = sync() if runs else None
    return broadcast_object(report, d, "waiting for rank 0's sync into the servers") if shared else report


def gathering_metrics(tally: Gathering | None) -> dict:
    """`sync_gathered_mb`: the most megabytes of gathered (whole) tensors this rank held at
    once in the syncs since the last call, under FSDP2 (`Gathering`); nothing otherwise."""
    if tally is None:
        return {}
    peak, tally.peak_bytes = tally.peak_bytes, tally.live
    return {"sync_gathered_mb": peak / 2**20}
