"""`lorasync bench trl`: `lorasync train` against TRL 1.16's GRPOTrainer (colocated vLLM), same run.

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
import os
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

from lorasync.train.config import require

TASK_REWARDS = {"arith": (("correct", 1.0), ("number_only", 0.0))}  # as configs/smollm2_arith.yaml
MAX_MODEL_LEN = 512  # the colocated engine's (EngineConfig.max_model_len), given to TRL's too
DTYPES_COMPARED = ("float32", "bfloat16")  # TRL: bf16 autocast or none


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
    grad_accum: int = 2
    eval_n: int = 200
    dtype: str = "float32"
    out: str = "runs/bench_trl"
    seed: int = 0

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

    @property
    def completions(self) -> int:
        """Completions per optimizer step (both sides)."""
        return self.prompts_per_step * self.num_generations


def _log(message: str) -> None:
    print(f"[bench trl] {message}", file=sys.stderr, flush=True)


# -- the shared run ------------------------------------------------------------------------


def train_config(config: TrlBenchConfig):
    """The lorasync TrainConfig of the run (the TRL side is built to match it)."""
    from lorasync.train.config import (
        DataConfig, LoraSettings, ModelConfig, OptimConfig, RewardSpec, RolloutConfig, TrainConfig,
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
                          seed=config.seed),
        output_dir=str(Path(config.out) / "lorasync"),
    )


def step_rows(train) -> list[dict]:
    """The rows lorasync's trainer draws, step after step: TRL reads them in this order."""
    from lorasync.train.data import batch_at, load_rows

    rows = load_rows(train.data)
    return [row for step in range(train.optim.steps)
            for row in batch_at(rows, step, train.rollout.prompts_per_step, train.optim.seed)]


def summarize(steps: list[dict]) -> dict:
    """Means per step of step, generation, sync and the rest (training), with the raw rows."""
    def mean(key: str) -> float:
        return sum(s[key] for s in steps) / len(steps)

    out = {"steps": len(steps), **{k: mean(k) for k in ("step_seconds", "generation_seconds", "sync_seconds")}}
    out["train_seconds"] = out["step_seconds"] - out["generation_seconds"] - out["sync_seconds"]
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


def run_lorasync(config: TrlBenchConfig) -> dict:
    """`lorasync train` on the run; its per-step metrics and the saved adapter's folder."""
    from lorasync.backend.open import open_engine
    from lorasync.train import checkpoints
    from lorasync.train.trainer import GRPOTrainer

    train = train_config(config)
    engine = open_engine("colocated", train.sync.strategy, config.model, config.dtype,
                         seed=config.seed, lora_rank=config.rank)
    try:
        rows = GRPOTrainer(train, engine).train()
    finally:
        engine.close()
    keys = ("step_seconds", "generation_seconds", "sync_seconds", "reward_mean")
    side = summarize([{"step": r["step"], **{k: r[k] for k in keys}} for r in rows])
    side["sync"] = f"lorasync ({train.sync.strategy.value})"
    side["adapter"] = str(checkpoints.latest(Path(train.output_dir)) / "adapter")
    return side


# -- TRL -----------------------------------------------------------------------------------


def _stop_ids(model: str) -> set[int]:
    """The tokens that end a completion early: the tokenizer's EOS and the model's."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(model).eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos])
    return ids - {None}


def trl_rewards(config: TrlBenchConfig) -> tuple[list, list[float]]:
    """The task's reward functions and weights for TRL. `correct` gets the `truncated` column
    lorasync gives it (cut off at max_tokens without ending the turn: scores 0) from TRL's
    `completion_ids`."""
    from lorasync.tasks import TASKS

    task, stop = TASKS[config.task], _stop_ids(config.model)

    def with_truncated(fn):
        def reward(prompts, completions, completion_ids, **columns):
            cut = [len(ids) >= config.max_tokens and ids[-1] not in stop for ids in completion_ids]
            return fn(prompts, completions, truncated=cut, **columns)

        reward.__name__ = fn.__name__  # TRL logs rewards by function name
        return reward

    funcs = [with_truncated(getattr(task, name)) for name, _ in TASK_REWARDS[config.task]]
    return funcs, [weight for _, weight in TASK_REWARDS[config.task]]


def trl_args(config: TrlBenchConfig):
    """GRPOConfig matching the lorasync run (see the module docstring for the batch shape)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(Path(config.out) / "trl"), use_cpu=True, report_to="none", save_strategy="no",
        use_vllm=True, vllm_mode="colocate", vllm_max_model_length=MAX_MODEL_LEN,
        per_device_train_batch_size=config.completions // config.grad_accum,
        gradient_accumulation_steps=config.grad_accum,
        num_generations=config.num_generations, max_completion_length=config.max_tokens,
        temperature=1.0, max_steps=config.steps, learning_rate=config.lr,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, beta=0.0,
        shuffle_dataset=False,  # the rows are already in lorasync's order
        gradient_checkpointing=False, bf16=config.dtype == "bfloat16",
        model_init_kwargs={"dtype": config.dtype}, logging_steps=1, seed=config.seed,
    )


def build_trl(config: TrlBenchConfig, rows: list[dict]):
    """TRL's GRPOTrainer on the rows, its vLLM engine in this process."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    from lorasync.engines import vllm_compat
    from lorasync.integrations.trl import vllm_engine_args
    from lorasync.sync.policy import lora_targets

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as the colocated engine has it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm_compat.fresh_rope_cache()  # its own rotary modules (see ColocatedEngine)
    funcs, weights = trl_rewards(config)
    args = trl_args(config)
    args.reward_weights = weights
    with vllm_engine_args(dtype=config.dtype, enforce_eager=True):
        return GRPOTrainer(
            model=config.model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows),
            peft_config=LoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
                                   target_modules=lora_targets(["all-linear"])),
        )


def choose_sync(trainer) -> str | None:
    """Try TRL's own sync once (before any step: the adapter is still zero); on failure
    undo its merge and install lorasync's. Returns the error TRL's sync raised, or None."""
    from lorasync.integrations.trl import use_lorasync_sync

    generation = trainer.vllm_generation
    try:
        generation.sync_weights()
        return None
    except Exception as err:  # noqa: BLE001 - whatever TRL's sync raised, it is reported
        error = f"{type(err).__name__}: {err}"
    generation.model.unmerge_adapter()  # merged before it crashed; B = 0, so exact
    use_lorasync_sync(trainer)  # its first sync sends every tensor: vLLM is whole again
    return error


class StepTimes:
    """Per optimizer step: wall time (a TrainerCallback), and the time inside the wrapped
    generation and sync methods during it."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._start = 0.0

    def begin(self) -> None:
        self.rows.append({"step": len(self.rows) + 1, "generation_seconds": 0.0, "sync_seconds": 0.0})
        self._start = time.perf_counter()

    def end(self) -> None:
        self.rows[-1]["step_seconds"] = time.perf_counter() - self._start

    def timed(self, fn, key: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.rows:
                    self.rows[-1][key] += time.perf_counter() - start

        return wrapper

    def callback(self):
        from transformers import TrainerCallback

        times = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                times.begin()

            def on_step_end(self, args, state, control, **kwargs):
                times.end()

        return Timer()


def run_trl(config: TrlBenchConfig, rows: list[dict]) -> dict:
    """TRL's GRPOTrainer on the run; its per-step times, the sync it used, its adapter."""
    from lorasync.engines import vllm_compat
    from lorasync.engines.colocated import ColocatedEngine

    trainer = build_trl(config, rows)
    try:
        error = choose_sync(trainer)
        sync = "trl" if error is None else f"lorasync (TRL's own sync crashed: {error})"
        _log(f"TRL syncs with {sync}")
        times = StepTimes()
        generation = trainer.vllm_generation
        # instance attributes: the timers wrap whichever sync is installed, on this trainer only
        generation.sync_weights = times.timed(generation.sync_weights, "sync_seconds")
        generation.generate = times.timed(generation.generate, "generation_seconds")
        trainer.add_callback(times.callback())
        trainer.train()
        adapter = str(Path(config.out) / "trl" / "adapter")
        trainer.save_model(adapter)
        rewards = {log["step"]: log["reward"] for log in trainer.state.log_history if "reward" in log}
    finally:
        vllm_compat.shutdown(trainer.vllm_generation.llm, others_alive=ColocatedEngine._live > 0)
    for row in times.rows:
        row["reward_mean"] = rewards.get(row["step"])
    side = summarize(times.rows)
    side.update(sync=sync, own_sync_error=error, adapter=adapter)
    return side


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
        _log(f"lorasync train: {config.steps} steps")
        sides["lorasync"] = run_lorasync(config)
        _log(f"TRL GRPOTrainer: {config.steps} steps")
        sides["trl"] = run_trl(config, step_rows(train_config(config)))
        gc.collect()
        for name, side in sides.items():
            _log(f"accuracy after {name}")
            side["accuracy_after"] = accuracy(config, side["adapter"])
    result["sides"] = sides
    result["trl_sync"] = sides["trl"]["sync"]
    return result


def format_table(result: dict) -> str:
    """The human table: seconds per step (mean over steps) and accuracy before -> after."""
    c = result["config"]
    before = result["accuracy_before"]["accuracy"]
    lines = [
        f"bench trl: {c['model']}, {c['task']}, {c['steps']} steps x {c['prompts_per_step']} prompts x "
        f"{c['num_generations']} completions (max {c['max_tokens']} tokens), {c['dtype']}, "
        f"on {result['machine']['cpu_model']}",
        f"{'':22}{'s/step':>9}{'gen s/step':>12}{'sync s/step':>13}{'train s/step':>14}"
        f"   accuracy ({c['eval_n']} held out)",
    ]
    for name, side in result["sides"].items():
        label = "lorasync" if name == "lorasync" else (
            "TRL (TRL sync)" if side["sync"] == "trl" else "TRL (lorasync sync)")
        lines.append(
            f"{label:22}{side['step_seconds']:9.2f}{side['generation_seconds']:12.2f}"
            f"{side['sync_seconds']:13.3f}{side['train_seconds']:14.2f}"
            f"   {before:.1%} -> {side['accuracy_after']['accuracy']:.1%}"
        )
    error = result["sides"]["trl"]["own_sync_error"]
    if error is not None:
        lines.append(f"TRL's own sync crashed here ({error}): TRL ran with use_lorasync_sync")
    return "\n".join(lines)
