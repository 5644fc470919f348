"""`lorasync bench trl`: `lorasync train` against TRL 1.16's GRPOTrainer (colocated vLLM), same run.

Three sides by default (`--sides`): `lorasync` (shared-prefix scoring, the default), `plain`
(lorasync scoring each sequence whole, as TRL does) and `trl` (`trl_side.py`), one after the
other in this process; per side steps and completion tokens per second, peak memory (this
process's, measured afresh for each side: `machine.reset_peak_rss`), and the ratios of
lorasync's steps per second to the others'.

Both sides get the same model, task rows (the same prompts at the same step), rewards and
weights, LoRA (rank, alpha 2 x rank, all-linear), optimizer (AdamW, constant lr, weight decay
0.01, grad norm 1.0), batch shape and steps, one after the other in this process. Per step
each reports its wall time and the parts spent generating (vLLM) and syncing the adapter into
vLLM; the rest is the training computation. Afterwards each side's adapter is evaluated on
the task's held-out split, greedy, by `lorasync eval`'s machinery, beside the base model.

Batch shape: lorasync draws `prompts_per_step` prompts, samples `num_generations` each and
takes one optimizer step over them in `grad_accum` micro-batches. TRL 1.16 counts the same
in completions: per_device_train_batch_size = completions / grad_accum and
gradient_accumulation_steps = grad_accum give generation_batch_size = completions and
steps_per_generation = grad_accum: one generation batch per optimizer step, one sync.
Both sides sync `steps` times, the first sending every tensor: lorasync after each
optimizer step, TRL before each step's generation. TRL reads the rows lorasync draws, in
lorasync's order (no shuffle), so step k sees the same prompts on both sides.

TRL's own sync (merge, `load_weights`, unmerge) crashes on some vLLM CPU backends
(integrations/trl.py). It is tried first, outside the timed steps; if it raises, the
adapter it merged (still zero) is unmerged and TRL runs with `use_lorasync_sync`, and the
result says so.
"""

from __future__ import annotations

import gc
import sys
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

from lorasync.bench.trl_side import MAX_MODEL_LEN, TASK_REWARDS, _log, run_trl
from lorasync.train.config import require

DTYPES_COMPARED = ("float32", "bfloat16")  # TRL: bf16 autocast or none
# lorasync with shared-prefix scoring (the default), lorasync scoring each sequence whole, TRL
SIDES = ("lorasync", "plain", "trl")
SIDE_LABELS = {"lorasync": "lorasync train", "plain": "lorasync train, shared_prefix off", "trl": "TRL GRPOTrainer"}


@dataclass
class TrlBenchConfig:
    model: str  # a local model folder (the CLI resolves hub names)
    task: str = "arith"
    steps: int = 10
    prompts_per_step: int = 8
    num_generations: int = 8
    max_tokens: int = 16
    lr: float = 3e-4
    rank: int = 16
    grad_accum: int = 4  # configs/smollm2_arith.yaml's
    eval_n: int = 200
    dtype: str = "float32"
    out: str = "runs/bench_trl"
    seed: int = 0
    sides: tuple[str, ...] = SIDES

    def __post_init__(self) -> None:
        require((Path(self.model) / "config.json").is_file(), "--model", self.model,
                "no config.json there: pass a model folder or a hub name")
        require(self.task in TASK_REWARDS, "--task", self.task, f"use one of {', '.join(TASK_REWARDS)}")
        require(self.dtype in DTYPES_COMPARED, "--dtype", self.dtype, f"use one of {', '.join(DTYPES_COMPARED)}")
        for flag, value, low in (("--steps", self.steps, 1), ("--prompts-per-step", self.prompts_per_step, 1),
                                 ("--max-tokens", self.max_tokens, 1), ("--rank", self.rank, 1),
                                 ("--grad-accum", self.grad_accum, 1), ("--eval-n", self.eval_n, 1)):
            require(value >= low, flag, value, f"must be >= {low}")
        require(self.num_generations >= 2, "--num-generations", self.num_generations,
                "GRPO compares completions within a group: use >= 2")
        require(self.lr > 0, "--lr", self.lr, "must be > 0")
        require(self.completions % self.grad_accum == 0, "--grad-accum", self.grad_accum,
                f"must divide prompts-per-step x num-generations = {self.completions}")
        require(bool(self.out), "--out", self.out, "name an output folder")
        self.sides = tuple(self.sides)
        require(bool(self.sides) and set(self.sides) <= set(SIDES) and len(set(self.sides)) == len(self.sides),
                "--sides", ",".join(self.sides), f"name each of {', '.join(SIDES)} at most once (e.g. lorasync,trl)")

    @property
    def completions(self) -> int:
        """Completions per optimizer step (both sides)."""
        return self.prompts_per_step * self.num_generations


# -- the shared run ------------------------------------------------------------------------


def train_config(config: TrlBenchConfig, shared_prefix: bool = True):
    """The lorasync TrainConfig of the run (the TRL side is built to match it); with
    `shared_prefix` off, the `plain` side's."""
    from lorasync.train.config import (
        DataConfig, EngineSection, LoraSettings, ModelConfig, OptimConfig, RewardSpec, RolloutConfig, TrainConfig,
    )

    rewards = [RewardSpec(f"lorasync.tasks.{config.task}:{name}", weight)
               for name, weight in TASK_REWARDS[config.task]]
    return TrainConfig(
        model=ModelConfig(base=config.model, dtype=config.dtype),
        # one epoch of exactly the rows the run uses: each prompt once
        data=DataConfig(task=config.task, split="train", size=config.steps * config.prompts_per_step),
        rewards=rewards,
        lora=LoraSettings(rank=config.rank, alpha=2.0 * config.rank, targets=["all-linear"]),
        rollout=RolloutConfig(prompts_per_step=config.prompts_per_step, num_generations=config.num_generations,
                              max_tokens=config.max_tokens, temperature=1.0),
        optim=OptimConfig(steps=config.steps, lr=config.lr, grad_accum=config.grad_accum, beta=0.0,
                          seed=config.seed, shared_prefix=shared_prefix),
        engine=EngineSection(max_model_len=MAX_MODEL_LEN),
        output_dir=str(Path(config.out) / ("lorasync" if shared_prefix else "plain")),
    )


def step_rows(train) -> list[dict]:
    """The rows lorasync's trainer draws, step after step: TRL reads them in this order."""
    from lorasync.train.data import batch_at, load_rows

    rows = load_rows(train.data)
    return [row for step in range(train.optim.steps)
            for row in batch_at(rows, step, train.rollout.prompts_per_step, train.optim.seed)]


def summarize(steps: list[dict]) -> dict:
    """Means per step of step, generation, sync and the rest (training), steps and completion
    tokens per second (where the side counts its tokens), with the raw rows."""
    def mean(key: str) -> float:
        return sum(s[key] for s in steps) / len(steps)

    out = {"steps": len(steps), **{k: mean(k) for k in ("step_seconds", "generation_seconds", "sync_seconds")}}
    out["train_seconds"] = out["step_seconds"] - out["generation_seconds"] - out["sync_seconds"]
    seconds = sum(s["step_seconds"] for s in steps)
    out["steps_per_second"] = len(steps) / seconds
    counted = all(s.get("completion_tokens") is not None for s in steps)
    out["tokens_per_second"] = sum(s["completion_tokens"] for s in steps) / seconds if counted else None
    out["reward_mean"] = None if any(s["reward_mean"] is None for s in steps) else mean("reward_mean")
    out["per_step"] = steps
    return out


def accuracy(config: TrlBenchConfig, adapter: str | None) -> dict:
    """Held-out accuracy (greedy) of the base model or base + adapter."""
    from lorasync.tasks.eval import EvalConfig, run_eval

    result = run_eval(EvalConfig(model=config.model, adapter=adapter, task=config.task, split="test",
                                 n=config.eval_n, temperature=0.0, max_tokens=config.max_tokens,
                                 seed=config.seed, dtype=config.dtype), progress=True)
    keep = ("accuracy", "accuracy_by_level", "truncated", "number_only", "n", "adapter")
    return {k: result[k] for k in keep}


# -- lorasync ------------------------------------------------------------------------------


def run_lorasync(config: TrlBenchConfig, shared_prefix: bool = True) -> dict:
    """`lorasync train` on the run; its per-step metrics and the saved adapter's folder."""
    from lorasync.backend.open import open_engine
    from lorasync.train import checkpoints
    from lorasync.train.trainer import GRPOTrainer

    from lorasync import machine

    train = train_config(config, shared_prefix)
    process = machine.rss_bytes() or 0  # the process before the side: libraries, earlier sides' leftovers
    engine = open_engine("colocated", train.sync.strategy, config.model, config.dtype, seed=config.seed,
                         lora_rank=config.rank, max_model_len=train.engine.max_model_len,
                         batch_sequences=train.rollout.sequences)
    try:
        trainer = GRPOTrainer(train, engine)
        rows = trainer.train()
        memory = memory_parts(trainer, engine.kv_cache_bytes, process, rows)
    finally:
        engine.close()
    keys = ("step_seconds", "generation_seconds", "sync_seconds", "reward_mean", "completion_tokens",
            "seconds_forward", "seconds_backward", "trainer_tokens", "trainer_gflops")
    side = summarize([{"step": r["step"], **{k: r[k] for k in keys}} for r in rows])
    side["sync"] = f"lorasync ({train.sync.strategy.value})"
    side["shared_prefix"] = shared_prefix
    side["adapter"] = str(checkpoints.latest(Path(train.output_dir)) / "adapter")
    side["memory"] = memory
    return side


def memory_parts(trainer, kv_cache_bytes: int | None, process: int, rows: list[dict]) -> dict[str, int]:
    """What a lorasync side's memory holds, in bytes: the process before it, the trainer's
    weights (base and adapter), its optimizer state and gradients, the engine's copy of the
    weights and its KV cache, and the activations of the largest forward pass (measured,
    `train/profile.py`); the peak's rest is the allocator's and the libraries' working memory."""
    import torch

    params = list(trainer.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                for t in s.values() if torch.is_tensor(t))
    return {
        "process_before": process,
        "trainer_weights": weights,
        "optimizer_and_gradients": state + trained,
        "engine_weights": weights - trained,  # the served model: the base, the adapter merged in
        "kv_cache": kv_cache_bytes or 0,
        "activations": max(r.get("activation_bytes", 0) for r in rows),
    }


# -- the bench -----------------------------------------------------------------------------


def run_trl_bench(config: TrlBenchConfig) -> dict:
    """Both sides, then accuracies; the JSON-ready result. Progress goes to stderr, and so
    does anything the libraries print (stdout is the caller's, for the result)."""
    from lorasync import machine
    from lorasync.integrations.trl import check_trl_version

    try:
        check_trl_version()
    except (ImportError, RuntimeError) as err:  # not installed (PackageNotFoundError), or another
        raise ValueError(f"bench trl runs TRL's GRPOTrainer, which needs TRL 1.16: {err}; "
                         "pip install 'lorasync[trl]'") from None
    result: dict = {"config": asdict(config), "machine": machine.describe()}
    with redirect_stdout(sys.stderr):
        _log(f"accuracy of the base model on {config.eval_n} held-out problems")
        result["accuracy_before"] = accuracy(config, None)
        sides = {}
        for name in config.sides:  # each side's peak memory on its own (this process's)
            gc.collect()
            measured = machine.reset_peak_rss()
            _log(f"{SIDE_LABELS[name]}: {config.steps} steps")
            if name == "trl":
                trl = run_trl(config, step_rows(train_config(config)))
                sides["trl"] = summarize(trl.pop("per_step")) | trl
            else:
                sides[name] = run_lorasync(config, shared_prefix=name == "lorasync")
            sides[name]["peak_rss_bytes"] = machine.peak_rss_bytes() if measured else None
        gc.collect()
        for name, side in sides.items():
            _log(f"accuracy after {name}")
            side["accuracy_after"] = accuracy(config, side["adapter"])
    result["sides"] = sides
    result["trl_sync"] = sides["trl"]["sync"] if "trl" in sides else None
    result["ratios"] = ratios(sides)
    return result


def ratios(sides: dict) -> dict:
    """Steps per second of lorasync (shared prefix) over each other side's."""
    if "lorasync" not in sides:
        return {}
    rate = sides["lorasync"]["steps_per_second"]
    return {f"lorasync/{name}": rate / side["steps_per_second"] for name, side in sides.items() if name != "lorasync"}


def format_table(result: dict) -> str:
    """The human table: per step (mean over steps) seconds, steps and tokens per second, peak
    memory and accuracy before -> after; then the ratios of steps per second."""
    c = result["config"]
    before = result["accuracy_before"]["accuracy"]
    lines = [
        f"bench trl: {c['model']}, {c['task']}, {c['steps']} steps x {c['prompts_per_step']} prompts x "
        f"{c['num_generations']} completions (max {c['max_tokens']} tokens), {c['dtype']}, "
        f"on {result['machine']['cpu_model']}",
        f"{'':26}{'s/step':>8}{'gen':>7}{'sync':>7}{'train':>7}{'steps/s':>9}{'tok/s':>7}{'peak GB':>9}"
        f"   accuracy ({c['eval_n']} held out)",
    ]
    for name, side in result["sides"].items():
        label = {"lorasync": "lorasync", "plain": "lorasync, prefix unshared"}.get(name) or (
            "TRL (TRL sync)" if side["sync"] == "trl" else "TRL (lorasync sync)")
        tokens = "-" if side["tokens_per_second"] is None else f"{side['tokens_per_second']:.1f}"
        peak = "-" if side["peak_rss_bytes"] is None else f"{side['peak_rss_bytes'] / 1e9:.1f}"
        lines.append(
            f"{label:26}{side['step_seconds']:8.2f}{side['generation_seconds']:7.2f}"
            f"{side['sync_seconds']:7.3f}{side['train_seconds']:7.2f}{side['steps_per_second']:9.4f}"
            f"{tokens:>7}{peak:>9}   {before:.1%} -> {side['accuracy_after']['accuracy']:.1%}"
        )
    for name, side in result["sides"].items():
        if side.get("memory") and side["peak_rss_bytes"]:
            parts = side["memory"]
            rest = side["peak_rss_bytes"] - sum(parts.values())
            held = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f}" for k, v in parts.items())
            lines.append(f"memory of {name}, GB: {held}, rest {rest / 1e9:.2f} = peak {side['peak_rss_bytes'] / 1e9:.2f}")
    if result["ratios"]:
        lines.append("steps per second, " + ", ".join(f"{k}: {v:.2f}x" for k, v in result["ratios"].items()))
    error = result["sides"].get("trl", {}).get("own_sync_error")
    if error is not None:
        lines.append(f"TRL's own sync crashed here ({error}): TRL ran with use_lorasync_sync")
    return "\n".join(lines)
