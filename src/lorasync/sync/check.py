"""The sync-check's measurement and verdict, on an engine already open: sync N times, judge
the three levels (weights, logprobs, cache), and say it for people (`format_sync_check`).

The engine-free half of `lorasync sync-check`. It takes any engine of `sync/base.py`'s
interface (a `WeightReceiver`, and `Scorer`s to verify: the engine itself, or one per server),
so it imports nothing of `engines/` or `server/`; opening the engine (colocated or running
servers) and what only servers report is `lorasync.backend.check.run_sync_check`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lorasync.sync.base import Generator, Scorer, Strategy, WeightReceiver
from lorasync.sync.verify import (
    base_weight_change,
    cache_probes,
    default_tolerance,
    judge,
    measure_cache_floor,
    measure_floor,
    verdict_probes,
    verify,
    verify_cache,
)
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync


def check_sync(
    model: torch.nn.Module,
    engine: WeightReceiver | Scorer,
    strategy: Strategy,
    *,
    base: str | Path,
    dtype: str,
    repeat: int = 1,
    tolerance: float | None = None,
    scorers: Sequence[Scorer] | None = None,
    progress: bool = False,
) -> dict:
    """Sync `model` (the policy on the base model folder `base`) into `engine` by `strategy`
    `repeat` times, then verify: the weights read back (where the engine can) and each of
    `scorers`' logprobs on fixed probes (default: the engine itself; the result's
    `per_scorer_max_abs_logprob_diff` lists them in order, the other numbers are the worst). Without a `tolerance`,
    an engine that still serves the checkpoint is first measured with the adapter off (the
    floor) and judged against it; else against `tolerance` (default per `dtype`). The result
    as a JSON-ready dict; `result["ok"]` says whether parity held. The engine stays open."""
    scorers = [engine] if scorers is None else list(scorers)
    probes, long_prompts = verdict_probes(engine.vocab_size), cache_probes(engine.vocab_size)
    generates = isinstance(engine, Generator)  # the cache level needs generation
    floor = cache_floor = None
    if tolerance is None and engine.weight_version == 0:
        # the engine still serves the checkpoint: measure the implementations' disagreement,
        # and the engine's own with its cache, which these prompts now fill
        floor = measure_floor(model, engine, probes)
        cache_floor = measure_cache_floor(engine, long_prompts) if generates else None
    tolerance = default_tolerance(dtype) if tolerance is None else tolerance
    sync = WeightSync(model, engine, strategy)
    reports = [sync() for _ in tqdm(range(repeat), desc="sync", disable=not progress)]
    weights = check_weights(sync)
    checks = [verify(model, scorer, probes) for scorer in scorers]
    last = reports[-1]
    verdicts = [judge(c, tolerance, floor) for c in checks]
    worst = max(range(len(checks)), key=lambda i: checks[i].mean_abs_diff)
    logprob_ok = all(v.ok for v in verdicts)
    # the cache level: keys and values of the old weights that the sync left in the cache
    cache = verify_cache(engine, long_prompts, seed=2) if generates else None
    cache_verdict = judge(cache, tolerance, cache_floor) if cache else None
    result = {
        "ok": logprob_ok and (weights is None or weights.ok) and (cache_verdict is None or cache_verdict.ok),
        "logprob_ok": logprob_ok,
        # None where the engine does not generate
        "cache_ok": cache_verdict and cache_verdict.ok,
        "cache_verdict": cache_verdict and cache_verdict.describe(cache),
        "cache_check": cache and cache.to_dict() | ({"floor": cache_floor.to_dict()} if cache_floor else {}),
        "logprob_verdict": verdicts[worst].describe(checks[worst]),
        "judged_against": "floor" if floor is not None else "tolerance",
        # the weight level: None where the engine cannot read its weights back (servers)
        "weight_check": None if weights is None else weights.to_dict(),
        "max_abs_logprob_diff": max(c.max_abs_diff for c in checks),
        "mean_abs_logprob_diff": max(c.mean_abs_diff for c in checks),
        "quantile_abs_logprob_diff": max(c.quantile_abs_diff for c in checks),
        "per_scorer_max_abs_logprob_diff": [c.max_abs_diff for c in checks],
        "probe_tokens": checks[0].tokens,
        "tolerance": tolerance,
        "dtype": dtype,
        "strategy": strategy.value,
        "tensors_sent": last.tensors_sent,
        "bytes_sent": last.bytes_sent,
        "sync_seconds": last.seconds,
        "sync_seconds_all": [r.seconds for r in reports],
        "weight_version": last.version,
        "base_max_abs_change": base_weight_change(model, Path(base)),
    }
    if floor is not None:
        result |= {
            "floor_max_abs_logprob_diff": floor.max_abs_diff,
            "floor_mean_abs_logprob_diff": floor.mean_abs_diff,
            "floor_quantile_abs_logprob_diff": floor.quantile_abs_diff,
            "mean_bound": verdicts[0].mean_bound,
            "quantile_bound": verdicts[0].quantile_bound,
        }
    return result


def format_sync_check(result: dict) -> str:
    """sync-check's verdict for people: each level's numbers and bounds, whatever the verdict."""
    lines = [
        f"{'OK' if result['ok'] else 'MISMATCH'}: {result['strategy']}, {result['tensors_sent']} "
        f"tensors, {result['bytes_sent'] / 1e6:.2f} MB in {result['sync_seconds']:.3f} s, weight "
        f"version {result['weight_version']}, base weights changed by at most "
        f"{result['base_max_abs_change']:.3g}",
    ]
    weights = result["weight_check"]
    if weights is None:
        lines.append("  weights: not read back (this engine cannot show its weights)")
    else:
        how = "bit for bit" if weights["exact"] else "within the merge's rounding"
        lines.append(
            f"  weights {'ok' if weights['ok'] else 'MISMATCH'}: {weights['tensors']} tensors "
            f"compared {how}, {weights['mismatches']} differ, largest difference "
            f"{weights['max_abs_diff']:.3g}, {weights['unread']} not readable"
            + (f"; first: {weights['first_mismatch']} (by {weights['first_mismatch_diff']:.3g})"
               if weights["first_mismatch"] else "")
        )
    judged = (
        f"judged against the floor (adapter off, before the sync: mean "
        f"{result['floor_mean_abs_logprob_diff']:.3g}, p99 {result['floor_quantile_abs_logprob_diff']:.3g}, "
        f"max {result['floor_max_abs_logprob_diff']:.3g})"
        if result["judged_against"] == "floor"
        else f"judged against the fixed tolerance {result['tolerance']:.3g}"
    )
    lines.append(
        f"  logprobs {'ok' if result['logprob_ok'] else 'MISMATCH'} over {result['probe_tokens']} "
        f"tokens: {result['logprob_verdict']}; {judged}"
    )
    cache = result.get("cache_check")
    if cache is None:
        lines.append("  cache: not checked (this engine does not generate)")
    else:
        lines.append(
            f"  cache {'ok' if result['cache_ok'] else 'MISMATCH'} over {cache['tokens']} generated "
            f"tokens (the engine's sampling logprobs against its own scoring): {result['cache_verdict']}"
            + (f"; judged against the floor (mean {cache['floor']['mean_abs_diff']:.3g}, "
               f"p99 {cache['floor']['quantile_abs_diff']:.3g})" if "floor" in cache
               else f"; judged against the fixed tolerance {result['tolerance']:.3g}")
        )
    if "servers" in result:
        lines.append(
            f"  over {len(result['servers'])} server(s), {result['wire_bytes'] / 1e6:.3f} MB on the "
            f"wire, served versions {result['served_versions']}"
        )
    return "\n".join(lines)
