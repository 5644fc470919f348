"""`sync-check`: sync an adapter into an engine (colocated, or running servers) and verify.

The end-to-end proof of one sync path, usable from the CLI and from tests: the trainer loads
a base model and an adapter, syncs N times by a strategy, and every engine scores fixed probe
sequences against the trainer (each server on its own: spreading would hide one server's
stale weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lorasync.checkpoint import check_dtype, dtype_name
from lorasync.engines.open import STRATEGIES, default_strategy, open_engine
from lorasync.server.client import ServerEngine
from lorasync.sync.adapter import check_servable
from lorasync.sync.base import Scorer, Strategy
from lorasync.sync.policy import adapter_rank, load_policy
from lorasync.sync.verify import base_weight_change, default_tolerance, judge, measure_floor, verdict_probes, verify
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync


@dataclass
class SyncCheckConfig:
    base: str
    adapter: str
    dtype: str = "float32"  # the colocated engine's; servers serve in their own
    repeat: int = 1
    tolerance: float | None = None  # default per dtype
    strategy: str | None = None  # default: streaming colocated, factors with servers
    servers: list[str] = field(default_factory=list)
    token: str | None = None
    max_model_len: int | None = None  # the colocated engine's; default: EngineConfig's

    def __post_init__(self) -> None:
        check_dtype(self.dtype, "--dtype")
        if self.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {self.repeat}")
        if self.tolerance is not None and self.tolerance <= 0:
            raise ValueError(f"--tolerance must be > 0, got {self.tolerance}")
        self.kind = "server" if self.servers else "colocated"
        strategy = default_strategy(self.kind) if self.strategy is None else self.strategy
        self.strategy = Strategy.parse(strategy, "--strategy")
        if self.strategy is Strategy.AUTO:
            raise ValueError("--strategy auto decides by a training run's tokens per step: check "
                             "streaming and adapter one at a time")
        if self.strategy not in STRATEGIES[self.kind]:
            # check_pair's words are a config's (engine.kind = ...): say it in flags here
            takes = ", ".join(s.value for s in STRATEGIES[self.kind] if s is not Strategy.AUTO)
            raise ValueError(
                f"--strategy {self.strategy.value} needs --server (running `lorasync serve` "
                f"servers); without --server use one of {takes}"
                if self.kind == "colocated"
                else f"--strategy {self.strategy.value} does not work with --server, whose "
                f"servers take {takes}; drop --server to check it on a colocated engine"
            )


class _Pinned:
    """A scorer that asks one server of a ServerEngine only."""

    def __init__(self, engine: ServerEngine, index: int) -> None:
        self.engine, self.index = engine, index

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        return self.engine.score_on(self.index, sequences)


def run_sync_check(config: SyncCheckConfig, progress: bool = False) -> dict:
    """Run the check and return its result; `result["ok"]` says whether parity held."""
    if config.kind == "server":
        engine = open_engine("server", config.strategy, servers=config.servers, token=config.token)
        dtype = dtype_name(engine.dtype)
        try:
            model = load_policy(config.base, config.adapter, dtype)
        except Exception:
            engine.close()
            raise
    else:
        dtype = config.dtype
        model = load_policy(config.base, config.adapter, dtype)
        if config.strategy is Strategy.ADAPTER:
            check_servable(model)  # before the engine is built (about 20 s)
        engine = open_engine("colocated", config.strategy, config.base, dtype,
                             lora_rank=adapter_rank(model.active_peft_config),
                             max_model_len=config.max_model_len)
    tolerance = default_tolerance(dtype) if config.tolerance is None else config.tolerance
    try:
        probes = verdict_probes(engine.vocab_size)
        floor = None
        if config.tolerance is None and engine.weight_version == 0:
            # the engine still serves the checkpoint: measure the implementations' disagreement
            floor = measure_floor(model, engine, probes)
        sync = WeightSync(model, engine, config.strategy)
        reports = [sync() for _ in tqdm(range(config.repeat), desc="sync", disable=not progress)]
        weights = check_weights(sync)
        scorers: list[Scorer] = [engine]
        if isinstance(engine, ServerEngine):
            scorers = [_Pinned(engine, i) for i in range(len(engine.urls))]
        checks = [verify(model, scorer, probes) for scorer in scorers]
        extra = {}
        if isinstance(engine, ServerEngine):
            extra = {
                "servers": list(engine.urls),
                "per_server_max_abs_logprob_diff": [c.max_abs_diff for c in checks],
                "wire_bytes": engine.last_wire_bytes,
                "served_versions": engine.served_versions(),
            }
    finally:
        engine.close()
    last = reports[-1]
    verdicts = [judge(c, tolerance, floor) for c in checks]
    worst = max(range(len(checks)), key=lambda i: checks[i].mean_abs_diff)
    if floor is not None:
        extra |= {
            "floor_max_abs_logprob_diff": floor.max_abs_diff,
            "floor_mean_abs_logprob_diff": floor.mean_abs_diff,
            "floor_quantile_abs_logprob_diff": floor.quantile_abs_diff,
            "mean_bound": verdicts[0].mean_bound,
            "quantile_bound": verdicts[0].quantile_bound,
        }
    logprob_ok = all(v.ok for v in verdicts)
    return {
        "ok": logprob_ok and (weights is None or weights.ok),
        "logprob_ok": logprob_ok,
        "logprob_verdict": verdicts[worst].describe(checks[worst]),
        "judged_against": "floor" if floor is not None else "tolerance",
        # the weight level: None where the engine cannot read its weights back (servers)
        "weight_check": None if weights is None else weights.to_dict(),
        "max_abs_logprob_diff": max(c.max_abs_diff for c in checks),
        "mean_abs_logprob_diff": max(c.mean_abs_diff for c in checks),
        "quantile_abs_logprob_diff": max(c.quantile_abs_diff for c in checks),
        "probe_tokens": checks[0].tokens,
        "tolerance": tolerance,
        "dtype": dtype,
        "strategy": config.strategy.value,
        "engine": config.kind,
        "tensors_sent": last.tensors_sent,
        "bytes_sent": last.bytes_sent,
        "sync_seconds": last.seconds,
        "sync_seconds_all": [r.seconds for r in reports],
        "weight_version": last.version,
        "base_max_abs_change": base_weight_change(model, Path(config.base)),
        **extra,
    }


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
    if "servers" in result:
        lines.append(
            f"  over {len(result['servers'])} server(s), {result['wire_bytes'] / 1e6:.3f} MB on the "
            f"wire, served versions {result['served_versions']}"
        )
    return "\n".join(lines)
