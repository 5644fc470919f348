"""`bench trl`'s TRL side: TRL 1.16's GRPOTrainer (colocated vLLM) built to match lorasync's run
(`trl.train_config`), timed step by step (`StepTimes`), with TRL's own sync when it works here
and lorasync's when it crashes (`choose_sync`). See `trl.py` for the batch shape both share.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorasync.bench.trl import TrlBenchConfig

TASK_REWARDS = {"arith": (("correct", 1.0), ("number_only", 0.0))}  # as configs/smollm2_arith.yaml
MAX_MODEL_LEN = 128  # prompt + completion tokens, as configs/smollm2_arith.yaml: both sides' engines


def _log(message: str) -> None:
    print(f"[bench trl] {message}", file=sys.stderr, flush=True)


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
    from lorasync.tasks.registry import TASKS

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
    """TRL's GRPOTrainer on the run: its per-step times (`per_step`), the sync it used, its
    adapter."""
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
        # completion tokens of a step: TRL logs their mean length over the step's completions
        lengths = {log["step"]: log["completions/mean_length"] for log in trainer.state.log_history
                   if "completions/mean_length" in log}
    finally:
        vllm_compat.shutdown(trainer.vllm_generation.llm, others_alive=ColocatedEngine._live > 0)
    for row in times.rows:
        row["reward_mean"] = rewards.get(row["step"])
        length = lengths.get(row["step"])
        row["completion_tokens"] = None if length is None else round(length * config.completions)
    return {"per_step": times.rows, "sync": sync, "own_sync_error": error, "adapter": adapter}
