"""What `lorasync bench rollout` shows: the table, the ratios to sync, the plot.

Each run of the bench is keyed: `sync`, `async` (in-flight syncs wait for the running
requests) and `async-keep` (they land in flight: `rollout.in_flight: keep`).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

TINY = "tiny"  # --model tiny (rollout.TINY)
LAST_STEPS = 5  # "reward last": the mean over this many final steps (all, in shorter runs)
ASYNC_RUNS = {"wait": "async", "keep": "async-keep"}  # the key of an async run by in_flight


def ratios(modes: dict, run: str = "async") -> dict | None:
    """`run` / sync of the mean step time and of the mean wait (None without both runs)."""
    if not {"sync", run} <= set(modes):
        return None
    a, s = modes[run], modes["sync"]
    return {k: a[k] / s[k] if s[k] > 0 else None for k in ("step_seconds", "wait_seconds")}


def mode_label(mode: str, side: dict) -> str:
    if mode == "sync":
        return mode
    k = side["rollout"]["max_staleness"]
    return f"keep (K={k})" if side["rollout"].get("in_flight") == "keep" else f"async (K={k})"


def heading(result: dict) -> str:
    """What ran, in one line: the table's first and the plot's title."""
    c = result["config"]
    model = "tiny demo model" if c["model"] == TINY else c["model"]
    return (
        f"bench rollout: {model}, {c['task']}, {result['engine']['kind']} engine, "
        f"{c['steps']} steps x {c['prompts_per_step']} prompts x {c['num_generations']} completions "
        f"(max {c['max_tokens']} tokens), {c['dtype']}, seed {c['seed']}, on {result['machine']['cpu_model']}"
    )


def format_table(result: dict) -> str:
    """The human table: a row per run (means per step), then the ratios to sync."""
    last = min(LAST_STEPS, result["config"]["steps"])
    lines = [
        heading(result),
        f"{'':13}{'s/step':>8}{'wait s/step':>13}{'gen s/step':>12}{'tokens/s':>10}"
        f"{f'reward last {last}':>16}{'reward all':>12}{'staleness max':>15}",
    ]
    for mode, side in result["modes"].items():
        lines.append(
            f"{mode_label(mode, side):13}{side['step_seconds']:8.2f}{side['wait_seconds']:13.2f}"
            f"{side['generation_seconds']:12.2f}{side['tokens_per_second']:10.1f}"
            f"{side['reward_mean_last']:16.3f}{side['reward_mean']:12.3f}{side['staleness_max']:15d}"
        )

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    for run, key in (("async", "async_over_sync"), ("keep", "keep_over_sync")):
        ratio = result.get(key)
        if ratio is not None:
            lines.append(f"{run}/sync: step time {show(ratio['step_seconds'])}, wait {show(ratio['wait_seconds'])}")
    if result.get("plot"):
        lines.append(f"reward against wall-clock: {result['plot']}")
    return "\n".join(lines)


def plot_reward_vs_time(modes: dict, path: str | Path, title: str) -> None:
    """Each run's reward mean per step against the wall-clock seconds at the end of the step
    (the steps' times summed): which mode learns more in the same time."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, side in modes.items():
        elapsed, clock = [], 0.0
        for step in side["per_step"]:
            clock += step["step_seconds"]
            elapsed.append(clock)
        ax.plot(elapsed, [s["reward_mean"] for s in side["per_step"]], marker=".", label=mode_label(mode, side))
    ax.set_xlabel("wall-clock seconds (steps summed)")
    ax.set_ylabel("reward mean of the step's batch")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
