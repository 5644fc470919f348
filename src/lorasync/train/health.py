"""The live verdict in training: after each step, does the engine hold and serve the policy?

Two levels, as in `lorasync sync-check` (docs/verification.md): the weight level on a cadence
(`sync.check_weights_every`; `sync/weight_check.py`), and the logprob level every step, the
engine's sampling logprobs against the trainer's on the same tokens (`Rollout.health`), judged
by `verify.judge` against the floor measured before the first sync (random probes) and, in a
fresh run, step 1's own health check, which compares a zero adapter on the checkpoint on the
task's tokens. This module turns a step's metrics into that verdict and its warning.
"""

from __future__ import annotations

from lorasync.sync.verify import Verification, judge
from lorasync.sync.weight_check import WeightCheck


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
