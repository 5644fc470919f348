"""Strategy `auto`: measure `streaming` and `adapter` on the engine at hand, keep the cheaper.

Adapter syncs are tiny, but every decoded token pays for the unmerged adapter branch; merged
syncs cost more, and decode at the base model's speed. For the tokens generated between two
syncs (`tokens_per_step`):

    cost(strategy) = sync_seconds(strategy) + tokens_per_step * decode_seconds_per_token(strategy)

`choose_strategy` is the pure decision; `measure_and_choose` takes the measurements on a real
engine, through callables the `WeightSync` hands it (so this module imports no sync).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from lorasync.sync.base import AdapterReceiver, Strategy, SyncReport
from lorasync.sync.verify import probe_sequences

STREAMING, ADAPTER = Strategy.STREAMING.value, Strategy.ADAPTER.value
# What `auto` decodes to time decoding with and without the adapter (greedy, one batch).
AUTO_PROMPTS, AUTO_PROMPT_TOKENS, AUTO_DECODE_TOKENS = 4, 16, 32


@dataclass(frozen=True)
class Measurements:
    """Measured costs on one engine, keyed by strategy name (`streaming`, `adapter`)."""

    sync_seconds: Mapping[str, float]
    decode_seconds_per_token: Mapping[str, float]

    def to_dict(self) -> dict:
        return {k: dict(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    """Which strategy `auto` chose, and the numbers behind the choice."""

    strategy: str
    tokens_per_step: int
    seconds_per_step: Mapping[str, float]
    # Tokens per step above which merged is cheaper (0: always); None when merged decodes no
    # faster, so the sync cost alone decides.
    break_even_tokens: float | None
    measurements: Measurements

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "tokens_per_step": self.tokens_per_step,
            "seconds_per_step": dict(self.seconds_per_step),
            "break_even_tokens": self.break_even_tokens,
            "measurements": self.measurements.to_dict(),
        }


def choose_strategy(measurements: Measurements, tokens_per_step: int) -> Decision:
    """Pick the strategy with the lowest sync + decode seconds for `tokens_per_step` tokens.

    `tokens_per_step` is the number of tokens generated between two syncs (all rollouts of a
    step). Ties go to the merged strategy, whose decoding does not depend on adapter kernels.
    """
    if tokens_per_step < 0:
        raise ValueError(f"tokens_per_step must be >= 0, got {tokens_per_step}")
    sync, decode = measurements.sync_seconds, measurements.decode_seconds_per_token
    missing = {STREAMING, ADAPTER} - (set(sync) & set(decode))
    if missing:
        raise ValueError(
            f"measurements lack {sorted(missing)}: both sync_seconds and "
            f"decode_seconds_per_token need {STREAMING!r} and {ADAPTER!r}"
        )
    cost = {s: sync[s] + tokens_per_step * decode[s] for s in (STREAMING, ADAPTER)}
    extra_decode = decode[ADAPTER] - decode[STREAMING]
    break_even = (
        max(0.0, (sync[STREAMING] - sync[ADAPTER]) / extra_decode) if extra_decode > 0 else None
    )
    return Decision(
        strategy=ADAPTER if cost[ADAPTER] < cost[STREAMING] else STREAMING,
        tokens_per_step=tokens_per_step,
        seconds_per_step=cost,
        break_even_tokens=break_even,
        measurements=measurements,
    )


def measure_and_choose(
    engine: AdapterReceiver,
    sync: Callable[[Strategy], SyncReport],
    restore_base: Callable[[], None],
    tokens_per_step: int,
) -> Decision:
    """Measure both strategies' sync and decode cost on `engine`, and decide.

    The adapter is measured first, on the engine's checkpoint weights. Streaming then merges
    into the engine; if the adapter wins, `restore_base()` sends the base weights of the
    merged tensors back, so the adapter is again applied on the base alone.
    """
    prompts = probe_sequences(engine.vocab_size, n=AUTO_PROMPTS, length=AUTO_PROMPT_TOKENS, seed=1)
    sync_seconds, decode = {}, {}
    for strategy in (Strategy.ADAPTER, Strategy.STREAMING):
        sync(strategy)  # the first streaming sync sends everything; time the next
        sync_seconds[strategy.value] = sync(strategy).seconds
        decode[strategy.value] = min(
            engine.decode_seconds_per_token(
                prompts, AUTO_DECODE_TOKENS, use_adapter=strategy is Strategy.ADAPTER
            )
            for _ in range(2)  # the first batch of a new adapter or shape warms up
        )
    decision = choose_strategy(Measurements(sync_seconds, decode), tokens_per_step)
    if decision.strategy == ADAPTER:
        restore_base()
    return decision
