"""The live verdict in training: after each step, does the engine hold and serve the policy?

Two levels, as in `lorasync sync-check` (docs/verification.md): the weight level on a cadence
(`sync.check_weights_every`; `sync/weight_check.py`), and the logprob level every step, the
engine's sampling logprobs against the trainer's on the same tokens (`Rollout.health`), judged
by `verify.judge` against the floor measured before the first sync (random probes) and, in a
fresh run, step 1's own health check, which compares a zero adapter on the checkpoint on the
task's tokens. This module turns a step's metrics into that verdict and its warning.
"""

from __future__ import annotations

from lorasync.sync.base import Scorer
from lorasync.sync.verify import Verification, judge, measure_floor, verdict_probes
from lorasync.sync.weight_check import WeightCheck, check_weights, rotating_slice


class Floor:
    """The floor the logprob level is judged against in training (`value`; None: judged by the
    fixed tolerance). `measure` takes it on the random probes while the engine serves the
    checkpoint; with `task`, step 1's own health check is taken up too (`take`): a fresh run's
    first batch is the checkpoint with a zero adapter, on the task's own tokens."""

    def __init__(self) -> None:
        self.value: Verification | None = None
        self.pending = False

    def measure(self, model, engine, task: bool) -> None:
        if not isinstance(engine, Scorer):
            return  # an `Engine` need not be a `Scorer`: judged by the tolerance
        self.value = measure_floor(model, engine, verdict_probes(engine.vocab_size))
        self.pending = task

    def take(self, metrics: dict) -> None:
        if self.pending:
            self.value = self.value.worst(health_of(metrics))
            self.pending = False


class WeightChecks:
    """The weight level after each sync: every tensor the first time, then a rotating slice of
    1/`sync.weight_check_slices` (0: never). `checks(lock)` returns the verdict, or None where it
    does not run: where the engine cannot read its weights back, and on N ranks under FSDP2
    (they hold shards, not the values a check compares with) or against shared servers (every
    rank would read the same servers back)."""

    def __init__(self, sync, config, dist, shared: bool) -> None:
        one_view = not dist.active or (config.parallel.mode == "ddp" and not shared)
        self.sync, self.done = sync, 0
        self.slices = config.sync.weight_check_slices if one_view else 0

    def __call__(self, lock) -> WeightCheck | None:
        """The check after the latest sync, holding `lock` (the engine's, which generation
        takes too)."""
        if not self.slices:
            return None
        only = rotating_slice(self.sync, self.done, self.slices)
        self.done += 1
        with lock:
            return check_weights(self.sync, only)


def health_of(metrics: dict) -> Verification:
    """The health check of one step's metrics row, as a `Verification`."""
    return Verification(
        metrics["logprob_diff_max"], metrics["logprob_diff_mean"], metrics["completion_tokens"],
        metrics["logprob_diff_quantile"],
    )


def weight_metrics(check: WeightCheck | None) -> dict:
    """The weight-level verdict's columns of metrics.jsonl (none on steps it did not run)."""
    if check is None:
        return {}
    return {
        "weight_check_tensors": check.tensors,
        "weight_check_mismatches": check.mismatches,
        "weight_check_max_abs_diff": check.max_abs_diff,
        "weight_check_unread": check.unread,
        "weight_check_first_mismatch": check.first_mismatch or "",
        "weight_check_seconds": check.seconds,
    }


def health_warning(metrics: dict, tolerance: float, floor: Verification | None) -> str | None:
    """The warning for a step that skipped an update (a non-finite gradient), or whose engine
    does not hold or serve the trained policy: a weight mismatch, or logprob differences out of
    the bounds `verify.judge` sets. None for a healthy step."""
    problems = []
    if metrics.get("skipped_updates"):
        problems.append(f"{metrics['skipped_updates']} update(s) skipped: the gradient held NaN or Inf")
    engine = []
    if metrics.get("weight_check_mismatches"):
        engine.append(
            f"{metrics['weight_check_mismatches']} of {metrics['weight_check_tensors']} weight "
            f"tensors differ from the policy's (first {metrics['weight_check_first_mismatch'] or '?'}, "
            f"by up to {metrics['weight_check_max_abs_diff']:.3g})"
        )
    check = health_of(metrics)
    verdict = judge(check, tolerance, floor)
    if not verdict.ok:
        engine.append(f"engine/trainer logprob diff {verdict.describe(check)}")
    if engine:
        problems.append("; ".join(engine) + ": the engine is not serving the trained policy")
    return f"warning: step {metrics['step']}: " + "; ".join(problems) if problems else None
