"""`Generation`: the engine side as the trainer sees it (after TRL's `VLLMGeneration`).

One object owns the engine, the lock that generation and syncs take turns on, the
`WeightSync` into the engine and the weight-level checks after each sync. On N ranks it also
owns who syncs: each rank its own engine (colocated), or rank 0 alone into shared servers
while the others `follow` the version it reports (`rank_sync`), under FSDP2 with the streams
gathered one tensor at a time (`rank_sync.Gathering`). The engine says which it is
(`base.Engine.shared`); the trainer never asks what kind of engine it has.
"""

from __future__ import annotations

import contextlib
import threading
from typing import cast

from peft import PeftModel

from lorasync.sync.base import Completion, Engine, SharedEngine, SyncReport
from lorasync.sync.weight_check import WeightCheck
from lorasync.sync.weight_sync import WeightSync
from lorasync.train import rank_sync
from lorasync.train.config import TrainConfig
from lorasync.train.distributed import Dist
from lorasync.train.health import WeightChecks
from lorasync.train.rollout import Generated, generate


class Generation:
    """Batches from the engine and syncs into it, for a trainer on one rank of `dist`."""

    def __init__(self, engine: Engine, model: PeftModel, config: TrainConfig, dist: Dist) -> None:
        self.engine, self.config, self.dist = engine, config, dist
        rollout = config.rollout
        tokens_per_step = rollout.prompts_per_step * rollout.num_generations * rollout.max_tokens
        self.gathering = rank_sync.gathering(engine, dist, engine.shared)
        self.sync = WeightSync(
            model, engine, config.sync.strategy,
            tokens_per_step=tokens_per_step if config.sync.strategy == "auto" else None,
            load_weights=self.gathering.load_weights if self.gathering else None,
        )
        # generation and syncs take turns on the engine (async mode: in two threads)
        self.lock = threading.Lock()
        self.weight_checks = WeightChecks(self.sync, config, dist, engine.shared)

    @property
    def weight_version(self) -> int:
        """The version the engine serves: 0 as built, +1 per sync."""
        return self.engine.weight_version

    def generate(self, tokenizer, rows: list[dict], seed: int) -> Generated:
        """One batch from `rows`, with syncs kept out; or, with `rollout.in_flight: keep`, let
        in: the engine records the switch in each completion's per-token versions."""
        keep_out = self.config.rollout.in_flight == "wait"
        with self.lock if keep_out else contextlib.nullcontext():
            return generate(self.engine, tokenizer, self.config, rows, seed=seed)

    def complete(self, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int) -> list[Completion]:
        """One completion per prompt (reports, not training)."""
        with self.lock:
            return [group[0] for group in self.engine.generate(prompts, max_tokens, temperature, n=1, seed=seed)]

    def sync_policy(self) -> SyncReport:
        """One sync of the policy; on N ranks every rank calls it (`rank_sync.sync_policy`),
        and with shared servers the ranks rank 0 synced for take its version."""
        shared = self.engine.shared
        with self.lock:
            report = rank_sync.sync_policy(self.sync, self.dist, shared, self.gathering)
            if shared and not self.dist.main:  # rank 0 synced the servers: checked, this version
                cast(SharedEngine, self.engine).follow(report.version)
        return report

    def check_weights(self) -> WeightCheck | None:
        """The weight level after the latest sync, on its cadence (`health.WeightChecks`)."""
        return self.weight_checks(self.lock)

    def metrics(self) -> dict:
        """This rank's sync columns beyond `SyncReport`'s (`rank_sync.gathering_metrics`)."""
        return rank_sync.gathering_metrics(self.gathering)
