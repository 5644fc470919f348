"""What `lorasync bench rollout` shows (`bench/rollout_report.py`): each run's summary as a
row of the table, the ratios of async (and in-flight `keep`) runs to sync, and the plot of
reward against the summed step times. From hand-made per-step rows: no model, no engine."""

import pytest

from lorasync.bench.rollout import summarize
from lorasync.bench.rollout_report import LAST_STEPS, format_table, plot_reward_vs_time, ratios


def row(step: int, seconds: float, wait: float, reward: float, stale: int, tokens: int = 100) -> dict:
    return dict(step=step, step_seconds=seconds, wait_seconds=wait, generation_seconds=0.5, sync_seconds=0.01,
                completion_tokens=tokens, tokens_per_second=tokens / seconds, reward_mean=reward,
                staleness_max=stale, staleness_mean=stale / 2, policy_versions=[step - 1 - stale],
                logprob_diff_max=1e-6)


def test_summary_means_per_step_and_ratios():
    sync = summarize([row(s, 2.0, 1.0, 0.1 * s, 0) for s in range(1, 8)])
    asyn = summarize([row(s, 1.0, 0.25, 0.1 * s, 1, tokens=300) for s in range(1, 8)])
    assert sync["steps"] == 7 and sync["last_steps"] == LAST_STEPS == 5
    assert sync["reward_mean"] == pytest.approx(0.4) and sync["reward_mean_last"] == pytest.approx(0.5)
    assert asyn["tokens_per_second"] == pytest.approx(300) and asyn["staleness_mean"] == pytest.approx(0.5)
    assert ratios({"sync": sync, "async": asyn}) == {"step_seconds": 0.5, "wait_seconds": 0.25}
    assert ratios({"async": asyn}) is None
    result = {
        "config": {"model": "tiny", "task": "digits", "steps": 7, "prompts_per_step": 4, "num_generations": 8,
                   "max_tokens": 12, "dtype": "float32", "seed": 0},
        "engine": {"kind": "colocated"}, "machine": {"cpu_model": "cpu"},
        "modes": {"sync": sync | {"rollout": {"mode": "sync", "max_staleness": 0}},
                  "async": asyn | {"rollout": {"mode": "async", "max_staleness": 1}}},
        "async_over_sync": ratios({"sync": sync, "async": asyn}),
    }
    table = format_table(result).splitlines()
    assert "reward last 5" in table[1] and table[2].split() == ["sync", "2.00", "1.00", "0.50", "50.0", "0.500",
                                                               "0.400", "0"]
    assert table[3].startswith("async (K=1)") and table[4] == "async/sync: step time 0.50, wait 0.25"
    # in flight: its own row and ratio
    keep = summarize([row(s, 0.5, 0.2, 0.1 * s, 1) for s in range(1, 8)])
    result["modes"]["async-keep"] = keep | {"rollout": {"mode": "async", "max_staleness": 1, "in_flight": "keep"}}
    result["keep_over_sync"] = ratios(result["modes"], "async-keep")
    assert result["keep_over_sync"] == pytest.approx({"step_seconds": 0.25, "wait_seconds": 0.2})
    table = format_table(result | {"plot": "out/reward_vs_time.png"}).splitlines()
    assert table[4].startswith("keep (K=1)") and table[6] == "keep/sync: step time 0.25, wait 0.20"
    assert table[7] == "reward against wall-clock: out/reward_vs_time.png"


def test_reward_is_plotted_against_the_summed_step_times(tmp_path, monkeypatch):
    """One line per run; x = the steps' seconds summed, y = each step's reward."""
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.append((list(x), list(y), kw["label"])) or real(self, x, y, **kw))
    modes = {"sync": summarize([row(s, 2.0, 1.0, 0.1 * s, 0) for s in range(1, 4)]) | {"rollout": {"mode": "sync"}},
             "async": summarize([row(s, 1.0, 0.2, 0.2 * s, 1) for s in range(1, 4)])
             | {"rollout": {"mode": "async", "max_staleness": 1}}}
    plot_reward_vs_time(modes, tmp_path / "p.png", "title")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert drawn == [([2.0, 4.0, 6.0], pytest.approx([0.1, 0.2, 0.3]), "sync"),
                     ([1.0, 2.0, 3.0], pytest.approx([0.2, 0.4, 0.6]), "async (K=1)")]
