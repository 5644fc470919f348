"""Where a run's numbers go: one JSON object per step in metrics.jsonl, TensorBoard event files,
and at the end a PNG of reward and sync time, for people who would rather look than read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


class MetricsLog:
    """Appends step metrics to `<dir>/metrics.jsonl` and TensorBoard files in `<dir>/tb`.

    `write=False` (the ranks other than 0 of a data-parallel run, whose metrics rank 0 writes
    reduced): nothing is written; `rows()` gives the rows written since, from memory."""

    def __init__(self, out_dir: str | Path, write: bool = True) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        self.writes = write
        self.memory: list[dict] = []
        self.writer = None
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.dir / "tb"))

    def write(self, metrics: dict) -> None:
        self.memory.append(metrics)
        if not self.writes:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, metrics["step"])
        self.writer.flush()

    def rows(self) -> list[dict]:
        if not self.writes:
            return list(self.memory)
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):  # only the last line can be cut short by a crash
                    raise ValueError(f"{self.path}: line {number} is not JSON: {line[:80]!r}") from None
                print(f"lorasync: {self.path}: skipping its torn last line (a write cut short)", file=sys.stderr)
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run rewrites the steps after its checkpoint)."""
        if not self.writes:
            return
        kept = [r for r in self.rows() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_report(rows: list[dict], path: str | Path) -> None:
    """Reward (mean and band of one std) and sync seconds per step, in one PNG."""
    steps = [r["step"] for r in rows]
    mean = [r["reward_mean"] for r in rows]
    std = [r["reward_std"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, mean, color="tab:blue", label="reward mean")
    top.fill_between(
        steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
        color="tab:blue", alpha=0.2, label="± std",
    )
    top.set_ylabel("reward")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bottom.plot(steps, [1000 * r["sync_seconds"] for r in rows], color="tab:orange")
    bottom.set_ylabel("sync ms")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    diff = max(r["logprob_diff_max"] for r in rows)
    fig.suptitle(f"lorasync GRPO: reward and sync time (max engine/trainer logprob diff {diff:.2g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
