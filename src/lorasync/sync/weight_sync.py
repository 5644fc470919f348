"""`WeightSync`: one call after every optimizer step puts the trainer's policy into an engine.

The plan (what to send, checked against the engine's checkpoint) is computed once. Each
strategy (`base.Strategy`, docs/strategies.md) is one small function below that sends the
policy its way and returns the engine's new weight version:

- `streaming` (default): merged tensors, each computed straight into the engine's parameter
  (`MergedWeight`); the trainer model is never mutated. The first sync sends every tensor
  (the engine may have served something else), later ones only the changed groups.
- `merge-unmerge`: the known recipe, kept as the baseline: merge in place, send all, unmerge.
- `adapter`: the LoRA factors and config, served by vLLM's LoRA support (`adapter.py`).
- `factors`: the LoRA factors, merged by a `lorasync serve` server (`factors.py`).
- `auto`: measures `streaming` and `adapter` at the first sync, keeps the cheaper (`auto.py`).

Which engine takes which strategy is checked here, before anything is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch
from peft import PeftModel

from lorasync.sync.adapter import adapter_payload, check_servable
from lorasync.sync.auto import Decision, measure_and_choose
from lorasync.sync.base import (
    AdapterReceiver,
    Record,
    RecordReceiver,
    Strategy,
    SyncReport,
    WeightReceiver,
    WeightStream,
)
from lorasync.sync.factors import lora_records
from lorasync.sync.merge import Merger, merged
from lorasync.sync.merge_kernel import Kernel, choose
from lorasync.sync.plan import Entry, SyncPlan, plan_sync
from lorasync.sync.policy import adapter_rank


class _Sent:
    """Counts the tensors and bytes a sync hands the engine, as it hands them."""

    def __init__(self) -> None:
        self.tensors = self.bytes = 0

    def __call__(self, entries: Iterable[Entry], value: Callable[[Entry], torch.Tensor]) -> WeightStream:
        """`value` of each planned entry, named by its checkpoint tensor, counted as read."""
        entries = list(entries)
        return WeightStream([e.checkpoint for e in entries], self.counted((e.checkpoint, value(e)) for e in entries))

    def counted(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor

    def records(self, records: list[Record]) -> list[Record]:
        self.tensors += sum(len(r.tensors) for r in records)
        self.bytes += sum(r.nbytes for r in records)
        return records


class WeightSync:
    """Syncs a PeftModel's current policy into an engine: `report = sync()` after each step.

    `tokens_per_step` (tokens generated between two syncs) is what `auto` decides by, and
    only `auto` takes it. `merge_kernel` (`merge_kernel.Kernel`, or None/"auto": the faster
    one measured here) is how streaming merges. `load_weights` replaces the engine's own for
    the tensor streams (`train.rank_sync.Gathering`'s under FSDP2). Raises ValueError for a strategy the engine
    cannot take, with the fix.
    """

    def __init__(
        self,
        model: PeftModel,
        engine: WeightReceiver,
        strategy: str | Strategy = Strategy.STREAMING,
        tokens_per_step: int | None = None,
        merge_kernel: str | Kernel | None = None,
        load_weights: Callable[[WeightStream], int] | None = None,
    ) -> None:
        self.strategy = Strategy.parse(strategy)
        if (self.strategy is Strategy.AUTO) != (tokens_per_step is not None):
            raise ValueError(
                "tokens_per_step (tokens generated between two syncs) is what strategy='auto' "
                f"decides by, and only that: got strategy={self.strategy.value!r}, "
                f"tokens_per_step={tokens_per_step!r}"
            )
        self.model = model
        self.engine = engine
        # how a stream of tensors reaches the engine: its own `load_weights`, or on N ranks
        # under FSDP2 through `train.rank_sync.Gathering`, which gathers each as it is taken
        self.load_weights = load_weights or engine.load_weights
        self.tokens_per_step = tokens_per_step
        check_engine(self.strategy, engine, model)  # before anything is planned or sent
        self.plan: SyncPlan = plan_sync(model, engine.checkpoint_layout(), engine.weight_groups())
        self.kernel = choose(model.dtype, model.device, merge_kernel)  # measured once per machine, kept (merge_kernel.py)
        self.merger = Merger(model, self.plan.adapter_name, self.kernel.kernel)
        self.syncs = 0
        self.merged_synced = False  # a merged sync since the engine was built: changed-only is enough
        self.decision: Decision | None = None
        self.last_strategy: Strategy | None = None  # what the engine's weights come from

    def __call__(self) -> SyncReport:
        """Send the current policy; return what was sent and the engine's new version."""
        strategy = self.strategy
        if strategy is Strategy.AUTO:
            if self.decision is None:
                self.decision = measure_and_choose(
                    self.engine, self.send, self.restore_base, self.tokens_per_step
                )
            strategy = Strategy(self.decision.strategy)
        return self.send(strategy)

    def send(self, strategy: Strategy) -> SyncReport:
        """One sync by `strategy` (never `auto`: that is a choice between two of them)."""
        check_finite(self.model)  # before anything is sent: the engine keeps its last policy
        start, sent = time.perf_counter(), _Sent()
        with torch.no_grad():
            version = SENDERS[strategy](self, sent)
        self.syncs += 1
        self.last_strategy = strategy
        # Unchanged tensors hold the checkpoint's (= trainer's frozen base) values after any
        # full merged sync; an adapter sync leaves the engine's weights alone, and a factor
        # sync reloads on the server every group that differs from the checkpoint.
        self.merged_synced = self.merged_synced or strategy is not Strategy.ADAPTER
        seconds = time.perf_counter() - start
        return SyncReport(strategy.value, sent.tensors, sent.bytes, seconds, version, self._merged_by(strategy))

    def _merged_by(self, strategy: Strategy) -> str | None:
        if strategy is Strategy.STREAMING:
            return self.kernel.kernel.value
        if strategy is Strategy.FACTORS:
            return self.engine.merge_kernel  # the engine's own (a RecordReceiver merges)
        return None

    def restore_base(self) -> None:
        """Send the frozen base values of every changed tensor: the engine serves the checkpoint
        again (how `auto` hands the engine back to the adapter it chose)."""
        with torch.no_grad():
            self.load_weights(
                _Sent()(self.plan.changed, lambda e: self.model.get_parameter(e.param).to(self.engine.dtype))
            )


def _streaming(sync: WeightSync, sent: _Sent) -> int:
    entries = sync.plan.changed if sync.merged_synced else sync.plan.full
    dtype = sync.engine.dtype
    # Merged one at a time, as the engine asks for them; a `MergedWeight` is merged straight
    # into the parameter it is loaded into. (Merging the next one on a helper thread was
    # measured slower: the sync is memory-bound here.)
    return sync.load_weights(sent(entries, lambda e: _as(sync.merger(e), dtype)))


def _merge_unmerge(sync: WeightSync, sent: _Sent) -> int:
    dtype, model = sync.engine.dtype, sync.model
    with merged(model):
        return sync.load_weights(sent(sync.plan.full, lambda e: model.get_parameter(e.param).to(dtype)))


def _adapter(sync: WeightSync, sent: _Sent) -> int:
    tensors, config = adapter_payload(sync.model)
    dtype = sync.engine.dtype
    payload = dict(sent.counted((k, t.to(dtype)) for k, t in tensors.items()))
    return sync.engine.load_adapter(payload, config, name=sync.plan.adapter_name)


def _factors(sync: WeightSync, sent: _Sent) -> int:
    records = list(lora_records(sync.merger, sync.plan, sync.engine.dtype))
    return sync.engine.load_records(sent.records(records))


SENDERS: dict[Strategy, Callable[[WeightSync, _Sent], int]] = {
    Strategy.STREAMING: _streaming,
    Strategy.MERGE_UNMERGE: _merge_unmerge,
    Strategy.ADAPTER: _adapter,
    Strategy.FACTORS: _factors,
}


def check_engine(strategy: Strategy, engine: WeightReceiver, model: PeftModel | None = None) -> None:
    """ValueError, with the fix, unless `engine` can take syncs by `strategy` (of `model`)."""
    kind = type(engine).__name__
    if strategy is Strategy.FACTORS and not isinstance(engine, RecordReceiver):
        raise ValueError(
            f"strategy 'factors' sends LoRA factors for a lorasync server to merge, but the "
            f"engine is a {kind}, which does not merge factors: use a ServerEngine "
            "(engine.kind: server), or strategy 'streaming' on this engine"
        )
    if strategy in (Strategy.ADAPTER, Strategy.AUTO):
        if not isinstance(engine, AdapterReceiver):
            raise ValueError(
                f"strategy {strategy.value!r} needs an engine that serves LoRA adapters through "
                f"vLLM's LoRA support, but the engine is a {kind}: use a colocated engine "
                "(engine.kind: colocated), or strategy 'factors' with servers"
            )
        if model is not None:
            check_servable(model)  # fail before anything is sent, not at the first sync
            rank = adapter_rank(model.active_peft_config)
            if rank > engine.max_lora_rank:
                raise ValueError(
                    f"adapter rank {rank} exceeds the engine's max_lora_rank "
                    f"{engine.max_lora_rank} (0: built without LoRA support): build the engine "
                    f"with EngineConfig(enable_lora=True, max_lora_rank={rank})"
                )


def check_finite(model: PeftModel) -> None:
    """ValueError naming the first trainable tensor that holds NaN or Inf: such a policy is
    never synced (every engine would serve it, and nothing on the engine's side would undo it)."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(
                f"refusing to sync: {name} holds {bad} non-finite value(s) (NaN or Inf); the engine "
                "keeps the last policy it got. Find the update that produced them (the trainer "
                "skips updates whose gradient is not finite) or resume from a checkpoint"
            )


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; left as it is when it already is (a `MergedWeight` stays lazy)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
