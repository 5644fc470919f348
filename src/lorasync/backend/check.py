"""`lorasync sync-check`'s core: sync an adapter into an engine (colocated, or running
servers) and verify.

The end-to-end proof of one sync path, usable from the CLI and from tests: the trainer loads
a base model and an adapter, syncs N times by a strategy, and every engine scores fixed probe
sequences against the trainer (each server on its own: spreading would hide one server's
stale weights).

Why here, in `engines/`: opening the engine is this module's part (`open.py` says which
strategy each engine kind takes, which `SyncCheckConfig` checks), and only a `ServerEngine`
can be asked one server at a time. The measuring, judging and formatting take any engine of
`sync/base.py`'s interface and live in `lorasync.sync.check` (`check_sync`,
`format_sync_check`), since `sync/` imports neither `engines/` nor `server/`. Imports flow
down: `commands/cli` -> `engines/check` -> `engines/open`, `server/client`, `sync/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lorasync.served_model import check_dtype, dtype_name
from lorasync.backend.open import open_engine
from lorasync.sync.kinds import STRATEGIES, default_strategy
from lorasync.server.client.engine import ServerEngine
from lorasync.sync.adapter import check_servable
from lorasync.sync.base import Scorer, Strategy
from lorasync.sync.check import check_sync
from lorasync.sync.policy import adapter_rank, load_policy


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
    admin_token: str | None = None  # the servers' admin token; None: $LORASYNC_ADMIN_TOKEN, else `token`
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
        engine = open_engine("server", config.strategy, servers=config.servers, token=config.token,
                             admin_token=config.admin_token)
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
    try:
        scorers: list[Scorer] = [engine]
        if isinstance(engine, ServerEngine):
            scorers = [_Pinned(engine, i) for i in range(len(engine.urls))]
        result = check_sync(model, engine, config.strategy, base=config.base, dtype=dtype,
                            repeat=config.repeat, tolerance=config.tolerance, scorers=scorers,
                            progress=progress)
        per_scorer = result.pop("per_scorer_max_abs_logprob_diff")
        result["engine"] = config.kind
        if isinstance(engine, ServerEngine):
            result |= {
                "servers": list(engine.urls),
                "per_server_max_abs_logprob_diff": per_scorer,
                "wire_bytes": engine.last_wire_bytes,
                "served_versions": engine.served_versions(),
            }
    finally:
        engine.close()
    return result
