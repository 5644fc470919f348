"""`auto`'s decision (sync/auto.py), with injected measurements: few tokens per step choose the
adapter, many choose merged, the break-even separates the two, an adapter that decodes no faster
and syncs slower never wins, and incomplete measurements are refused. No vLLM here: measuring on
a real engine is test_adapter.py's `test_auto_measures_decides_and_keeps_parity`.
"""

import pytest

from lorasync.sync.auto import Measurements, choose_strategy

# Costs shaped like this machine's 0.5B bf16 measurements: the adapter syncs 20x faster,
# merged decoding is 2x faster per token.
MEASURED = Measurements(
    sync_seconds={"streaming": 0.64, "adapter": 0.03},
    decode_seconds_per_token={"streaming": 0.0145, "adapter": 0.029},
)


# --- the decision, with injected measurements --------------------------------------------


def test_few_tokens_per_step_choose_the_adapter():
    decision = choose_strategy(MEASURED, tokens_per_step=8)
    assert decision.strategy == "adapter"
    assert decision.seconds_per_step["adapter"] < decision.seconds_per_step["streaming"]


def test_many_tokens_per_step_choose_merged():
    decision = choose_strategy(MEASURED, tokens_per_step=8 * 32)
    assert decision.strategy == "streaming"
    assert decision.seconds_per_step == pytest.approx(
        {"streaming": 0.64 + 256 * 0.0145, "adapter": 0.03 + 256 * 0.029}
    )


def test_break_even_separates_the_regimes():
    decision = choose_strategy(MEASURED, tokens_per_step=0)
    assert decision.break_even_tokens == pytest.approx(0.61 / 0.0145)
    below, above = int(decision.break_even_tokens), int(decision.break_even_tokens) + 1
    assert choose_strategy(MEASURED, below).strategy == "adapter"
    assert choose_strategy(MEASURED, above).strategy == "streaming"
    assert decision.to_dict()["measurements"]["sync_seconds"]["adapter"] == 0.03


def test_adapter_never_wins_when_it_decodes_as_fast_and_syncs_slower():
    m = Measurements({"streaming": 0.1, "adapter": 0.2}, {"streaming": 0.01, "adapter": 0.01})
    decision = choose_strategy(m, tokens_per_step=0)
    assert decision.strategy == "streaming" and decision.break_even_tokens is None


def test_decision_needs_both_strategies_and_non_negative_tokens():
    with pytest.raises(ValueError, match="lack \\['adapter'\\]"):
        choose_strategy(Measurements({"streaming": 1.0}, {"streaming": 0.1}), 10)
    with pytest.raises(ValueError, match="tokens_per_step must be >= 0, got -1"):
        choose_strategy(MEASURED, -1)
