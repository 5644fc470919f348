"""Opening the engine a run syncs into: a colocated vLLM engine or running servers.

How each kind of engine is built for a strategy; which strategies each takes is
`sync/kinds.STRATEGIES` (checked here by `check_pair` before anything starts).
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.server.client.engine import ServerEngine
from lorasync.sync.base import Strategy
from lorasync.sync.kinds import check_pair
from lorasync.sync.policy import MAX_LORA_RANK

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
    batch_sequences: int | None = None,
) -> ColocatedEngine | ServerEngine:
    """The engine to sync into by `strategy`: a colocated engine on the model folder `model`
    in `dtype` (serving adapters up to `lora_rank` when the strategy needs vLLM's LoRA), or
    the running `servers` (their token: `token` or $LORASYNC_TOKEN; their admin token:
    `admin_token`, $LORASYNC_ADMIN_TOKEN or the token). `max_model_len`: the
    colocated engine's context (default: `EngineConfig`'s, capped by the model's); servers
    set theirs at start (`lorasync serve ... --max-model-len N`). `in_flight`: what the
    servers' requests do during a sync (`ServerEngine`). `batch_sequences`: the sequences a
    step generates at once, which size the colocated engine's KV cache (`EngineConfig`)."""
    check_pair(kind, strategy)
    if kind == "server":
        return ServerEngine(servers, token, in_flight=in_flight, admin_token=admin_token)
    lora = strategy in (Strategy.ADAPTER, Strategy.AUTO)
    return ColocatedEngine(
        EngineConfig(
            model=model, dtype=dtype, seed=seed, enable_lora=lora,
            max_lora_rank=max(MAX_LORA_RANK, lora_rank), max_model_len=max_model_len,
            batch_sequences=batch_sequences,
        )
    )
