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
- `adapter`: only the LoRA factors and config; the engine serves them through vLLM's LoRA
  support on its base weights (smallest sync, slower decoding). See `adapter_sync.py`.
- `auto`: measures `streaming` and `adapter` on this engine at the first sync and keeps the
  one cheaper for `tokens_per_step` generated tokens per step (`WeightSync.decision`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from peft import PeftModel

from lorasync.adapter_sync import (
    ADAPTER,
    MERGED,
    Decision,
    Measurements,
    adapter_payload,
    check_servable,
    choose_strategy,
    decode_seconds_per_token,
)
from lorasync.merge import Merger, merged
from lorasync.plan import SyncPlan, plan_sync
from lorasync.verify import probe_sequences

# Strategies that load merged weights (any engine serves them)...
STRATEGIES = ("streaming", "merge-unmerge")
# ...and all of them: `adapter` and `auto` need an engine with LoRA support (AdapterReceiver).
ALL_STRATEGIES = (*STRATEGIES, ADAPTER, "auto")
# What `auto` decodes to time decoding with and without the adapter (greedy, one batch).
AUTO_PROMPTS, AUTO_PROMPT_TOKENS, AUTO_DECODE_TOKENS = 4, 16, 32


class WeightReceiver(Protocol):
    """What the sync needs from an engine.

    `load_weights` must be done with the tensors it is given when it returns: they may share
    memory with the trainer's live parameters, and a `MergedWeight` is computed when read, so
    one kept for later could show the policy of a later step. Copy what you keep.
    """

    dtype: torch.dtype

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]: ...

    def weight_groups(self) -> Sequence[Sequence[str]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int: ...


class AdapterReceiver(WeightReceiver, Protocol):
    """What the `adapter` and `auto` strategies need in addition: serving a PEFT adapter."""

    vocab_size: int

    def load_adapter(
        self, tensors: Mapping[str, torch.Tensor], config: Mapping, name: str = "policy"
    ) -> int: ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        use_adapter: bool = True,
    ) -> list: ...


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

    def __init__(
        self,
        model: PeftModel,
        engine: WeightReceiver,
        strategy: str = "streaming",
        tokens_per_step: int | None = None,
    ) -> None:
        if strategy not in ALL_STRATEGIES:
            raise ValueError(
                f"strategy must be one of {', '.join(ALL_STRATEGIES)}, got {strategy!r}"
            )
        if (strategy == "auto") != (tokens_per_step is not None):
            raise ValueError(
                "tokens_per_step (tokens generated between two syncs) is what strategy='auto' "
                f"decides by, and only that: got strategy={strategy!r}, "
                f"tokens_per_step={tokens_per_step!r}"
            )
        self.model = model
        self.engine = engine
        self.strategy = strategy
        self.tokens_per_step = tokens_per_step
        self.plan: SyncPlan = plan_sync(model, engine.checkpoint_layout(), engine.weight_groups())
        self.merger = Merger(model, self.plan.adapter_name)
        if strategy in (ADAPTER, "auto"):
            check_servable(model)  # fail before anything is sent, not at the first sync
        self.syncs = 0
        self._merged_synced = False
        self.decision: Decision | None = None

    def __call__(self) -> SyncReport:
        """Send the current policy; return what was sent and the engine's new version."""
        if self.strategy == "auto" and self.decision is None:
            self.decision = self._choose()
        if self.strategy == "auto":
            return self._sync(self.decision.strategy)
        return self._sync(self.strategy)

    def _choose(self) -> Decision:
        """Measure both strategies' sync and decode cost on this engine, and decide.

        The adapter is measured first, on the engine's checkpoint weights. Streaming then
        merges into the engine; if the adapter wins, the base weights of the merged tensors are
        sent back, so the adapter is again applied on the base alone.
        """
        prompts = probe_sequences(
            self.engine.vocab_size, n=AUTO_PROMPTS, length=AUTO_PROMPT_TOKENS, seed=1
        )
        sync_seconds, decode = {}, {}
        for strategy in (ADAPTER, MERGED):
            self._sync(strategy)  # the first streaming sync sends everything; time the next
            sync_seconds[strategy] = self._sync(strategy).seconds
            decode[strategy] = min(
                decode_seconds_per_token(
                    self.engine, prompts, AUTO_DECODE_TOKENS, use_adapter=strategy == ADAPTER
                )
                for _ in range(2)  # the first batch of a new adapter or shape warms up
            )
        decision = choose_strategy(Measurements(sync_seconds, decode), self.tokens_per_step)
        if decision.strategy == ADAPTER:
            with torch.no_grad():
                self.engine.load_weights(
                    (e.checkpoint, self.model.get_parameter(e.param).to(self.engine.dtype))
                    for e in self.plan.changed
                )
        return decision

    def _sync(self, strategy: str) -> SyncReport:
        start = time.perf_counter()
        sent = {"tensors": 0, "bytes": 0}
        dtype = self.engine.dtype

        def counted(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                sent["tensors"] += 1
                sent["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        with torch.no_grad():
            if strategy == ADAPTER:
                tensors, config = adapter_payload(self.model)
                version = self.engine.load_adapter(
                    dict(counted((k, t.to(dtype)) for k, t in tensors.items())),
                    config,
                    name=self.plan.adapter_name,
                )
            elif strategy == "merge-unmerge":
                with merged(self.model):
                    version = self.engine.load_weights(
                        counted(
                            (e.checkpoint, self.model.get_parameter(e.param).to(dtype))
                            for e in self.plan.full
                        )
                    )
            else:
                entries = self.plan.changed if self._merged_synced else self.plan.full

                # Merged one at a time, as the engine asks for them; a `MergedWeight` is merged
                # straight into the parameter it is loaded into. (Merging the next one on a
                # helper thread was measured slower: the sync is memory-bound here.)
                version = self.engine.load_weights(
                    counted((e.checkpoint, _as(self.merger(e), dtype)) for e in entries)
                )
        self.syncs += 1
        # Unchanged tensors hold the checkpoint's (= trainer's frozen base) values after any
        # full merged sync, and an adapter sync leaves the engine's weights alone.
        self._merged_synced = self._merged_synced or strategy != ADAPTER
        return SyncReport(
            strategy=strategy,
            tensors_sent=sent["tensors"],
            bytes_sent=sent["bytes"],
            seconds=time.perf_counter() - start,
            version=version,
        )


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; left as it is when it already is (a `MergedWeight` stays lazy)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
