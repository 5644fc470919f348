"""Opening the engine a run syncs into: a colocated vLLM engine or running servers.

The one place that knows which strategy each engine kind takes (`STRATEGIES`), so that a
config can be refused before anything starts, and how each kind is built for a strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.server.client import ServerEngine
from lorasync.sync.base import Strategy
from lorasync.sync.policy import MAX_LORA_RANK

S = Strategy
# Merged strategies go anywhere; `adapter` and `auto` need vLLM's LoRA support in this
# process; `factors` needs a lorasync server to merge them.
STRATEGIES = {
    "colocated": (S.STREAMING, S.MERGE_UNMERGE, S.ADAPTER, S.AUTO),
    "server": (S.FACTORS, S.STREAMING, S.MERGE_UNMERGE),
}
ENGINE_KINDS = tuple(STRATEGIES)


def default_strategy(kind: str) -> Strategy:
    """The strategy a kind of engine syncs by unless told otherwise (the first it takes)."""
    return STRATEGIES[kind][0]


def check_pair(kind: str, strategy: Strategy, kind_field: str = "engine.kind",
               strategy_field: str = "sync.strategy") -> None:
    """ValueError, naming the fields and the fix, unless engines of `kind` take `strategy`."""
    if kind not in STRATEGIES:
        raise ValueError(f"{kind_field} must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    if strategy not in STRATEGIES[kind]:
        takes = [k for k, strategies in STRATEGIES.items() if strategy in strategies]
        raise ValueError(
            f"{strategy_field} = {strategy.value!r} does not work with {kind_field} = {kind!r}, "
            f"which takes {', '.join(s.value for s in STRATEGIES[kind])}: use one of those, "
            f"or {kind_field} = {takes[0]!r}"
        )


def open_engine(
    kind: str,
    strategy: Strategy,
    model: str = "",
    dtype: str = "float32",
    seed: int = 0,
    lora_rank: int = 0,
    servers: Sequence[str] = (),
    token: str | None = None,
    admin_token: str | None = None,
    max_model_len: int | None = None,
    in_flight: str = "wait",
) -> ColocatedEngine | ServerEngine:
    """The engine to sync into by `strategy`: a colocated engine on the model folder `model`
    in `dtype` (serving adapters up to `lora_rank` when the strategy needs vLLM's LoRA), or
    the running `servers` (their token: `token` or $LORASYNC_TOKEN; their admin token:
    `admin_token`, $LORASYNC_ADMIN_TOKEN or the token). `max_model_len`: the
    colocated engine's context (default: `EngineConfig`'s, capped by the model's); servers
    set theirs at start (`lorasync serve ... --max-model-len N`). `in_flight`: what the
    servers' requests do during a sync (`ServerEngine`)."""
    check_pair(kind, strategy)
    if kind == "server":
        return ServerEngine(servers, token, in_flight=in_flight, admin_token=admin_token)
    lora = strategy in (Strategy.ADAPTER, Strategy.AUTO)
    return ColocatedEngine(
        EngineConfig(
            model=model, dtype=dtype, seed=seed, enable_lora=lora,
            max_lora_rank=max(MAX_LORA_RANK, lora_rank), max_model_len=max_model_len,
        )
    )
