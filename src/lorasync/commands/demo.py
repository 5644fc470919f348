"""`lorasync demo`: the embedded default. A tiny model learns a toy task by GRPO in minutes on CPU.

What it does, all locally: build a tiny Qwen2 and pre-train it briefly on synthetic text (a
freshly initialised model samples nearly uniformly, and GRPO then has nothing to work with:
measured, see ../shared/research/vllm-cpu-findings.md); run GRPO with LoRA and a colocated vLLM
engine on the task "write digits" (reward: share of digit characters); write the run folder:
metrics.jsonl, report.png, TensorBoard files, checkpoints, and samples before and after.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasync.train.config import DataConfig, ModelConfig, OptimConfig, RewardSpec, RolloutConfig, TrainConfig
from lorasync.commands.tiny import _WORDS, make_tiny_model, synthetic_corpus


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
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def demo_config(out: Path, steps: int = 60, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(base=str(out / "base")),
        data=DataConfig(prompts=demo_prompts(seed=seed)),
        rewards=[RewardSpec(function="lorasync.train.rewards:digit_fraction")],
        rollout=RolloutConfig(prompts_per_step=4, num_generations=8, max_tokens=12),
        optim=OptimConfig(steps=steps, lr=2e-3, seed=seed),
        output_dir=str(out),
    )


def run_demo(out: str | Path = "runs/demo", steps: int = 60, seed: int = 0, progress: bool = True) -> dict:
    """Build, pre-train, train; return a summary (also written to summary.json)."""
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig
    from lorasync.train.trainer import GRPOTrainer

    out = Path(out)
    base = out / "base"
    if not (base / "model.safetensors").is_file():
        make_tiny_model(base, arch="qwen2", seed=seed)
        pretrain(base, seed=seed)
    config = demo_config(out, steps=steps, seed=seed)
    engine = ColocatedEngine(EngineConfig(model=str(base), seed=seed))
    try:
        trainer = GRPOTrainer(config, engine)
        probe = demo_prompts(n=4, seed=seed + 7)
        trainer.sync()
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
        "sync_seconds_median": sorted(r["sync_seconds"] for r in rows)[len(rows) // 2],
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(probe, before, after)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
