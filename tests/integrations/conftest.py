"""What the TRL integration's tests share: a tiny deterministic TRL config and a fixture that
builds a TRL trainer with its own colocated vLLM engine."""

from __future__ import annotations

import os

import pytest
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from lorasync.engines import vllm_compat
from lorasync.integrations.trl import vllm_engine_args

TRAINERS = {"grpo": (GRPOTrainer, GRPOConfig), "rloo": (RLOOTrainer, RLOOConfig)}
PROMPTS = ["one two three", "the cat is", "red blue green", "sun and moon", "train the model"]


def completion_length(completions: list[str], **_) -> list[float]:
    """Toy reward: characters in the completion (varies enough to give nonzero advantages)."""
    return [float(len(c)) for c in completions]


def config(kind: str, output_dir: str, **overrides):
    """A tiny, deterministic CPU run: one prompt x 4 completions per optimizer step."""
    values = dict(
        output_dir=output_dir,
        use_vllm=True,
        vllm_mode="colocate",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=2e-2,
        bf16=False,  # TRL defaults to bf16 autocast; the parity check is in float32
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    values.update(overrides)
    return TRAINERS[kind][1](**values)


@pytest.fixture
def build_trainer(tmp_path):
    """build_trainer(kind, model_dir, trainer_args=None, reward=None, **vllm_args) -> a TRL
    trainer with its own vLLM engine."""
    from lorasync.engines.colocated import ColocatedEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    built = []

    def build(kind: str, model_dir: str, trainer_args: dict | None = None, reward=None, **vllm_args):
        """`trainer_args`: the trainer's other keyword arguments (rollout_func); `reward`:
        its reward function (default `completion_length`)."""
        # TRL's engine must not share rotary modules with the session's other engines (as
        # ColocatedEngine does it)
        vllm_compat.fresh_rope_cache()
        with vllm_engine_args(**vllm_args):
            trainer = TRAINERS[kind][0](
                model=model_dir,
                reward_funcs=reward or completion_length,
                args=config(kind, str(tmp_path / kind)),
                train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                **(trainer_args or {}),
            )
        built.append(trainer)
        return trainer

    yield build
    for trainer in built:  # without tearing down what the session's other engines use
        vllm_compat.shutdown(trainer.vllm_generation.llm, others_alive=ColocatedEngine._live > 0)
