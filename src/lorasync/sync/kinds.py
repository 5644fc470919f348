"""What a run may ask of each kind of engine: the strategies it takes (`STRATEGIES`, the one
table; the config, the sync-check command and `backend/open.py` derive their checks from it)
and what a sync may do to requests running on a server (`IN_FLIGHT`).

Pure data and checks: imports nothing of the engines, so a config is refused before any
engine module is loaded.
"""

from __future__ import annotations

from lorasync.sync.base import Strategy

# what a sync does to the requests running on a server: vLLM's pause modes `wait` (they finish
# on the old weights first) and `keep` (frozen, then continued on the new ones); never `abort`
IN_FLIGHT = ("wait", "keep")
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
