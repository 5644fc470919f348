"""After a sync, real vLLM serves the trainer's policy: per-token logprobs match in float32."""

import pytest
import torch

from helpers import VARIANTS, peft_model, policy
from lorasync.merged_weight import MergedWeight
from lorasync.sync import STRATEGIES, WeightSync
from lorasync.verify import TOLERANCES, probe_sequences, verify

pytestmark = pytest.mark.vllm

ADAPTERS = {
    "all-linear": dict(targets=["all-linear"]),
    "q-v-only": dict(targets=["q_proj", "v_proj"]),
    "save-embed": dict(targets=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    "save-lm-head": dict(targets=["all-linear"], modules_to_save=["lm_head"]),
}


def step(model) -> None:
    """Stand-in for an optimizer step: move every trainable tensor."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn_like(param))


CASES = [
    (model, adapter)
    for model in ("qwen2-tied", "llama", "qwen3")
    for adapter in ADAPTERS
    # A tied model has no separate lm_head to train; its embedding case covers both.
    if not (model == "qwen2-tied" and adapter == "save-lm-head")
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_name,adapter", CASES)
def test_parity_after_sync_float32(tiny_model, engine_for, model_name, adapter, strategy):
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir)
    trainer = policy(model_dir, adapter_name="policy_v1", **ADAPTERS[adapter])
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine, strategy=strategy)

    report = sync()  # the first sync sends everything

    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    assert report.version == engine.weight_version
    assert report.tensors_sent == len(engine.checkpoint_layout())

    step(trainer)
    report = sync()  # later ones only what the adapter changes (streaming)

    result = verify(trainer, engine, probes)
    assert result.max_abs_diff <= 1e-4, result
    expected = len(sync.plan.changed if strategy == "streaming" else sync.plan.full)
    assert report.tensors_sent == expected
    # The adapter moved the policy far from the base: parity is not trivially true.
    with trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-2


@pytest.mark.parametrize("model_name", ["qwen2", "qwen2-tied"])
def test_parity_default_strategy_bfloat16(tiny_model, engine_for, model_name):
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir, "bfloat16")
    trainer = policy(model_dir, dtype="bfloat16", adapter_name="pol", modules_to_save=["embed_tokens"])
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine)
    sync()
    step(trainer)
    sync()
    assert verify(trainer, engine, probes).max_abs_diff <= TOLERANCES["bfloat16"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_for_every_lora_variant(tiny_model, engine_for, variant):
    """The default strategy on real vLLM, for each LoRA variant PEFT offers (float32)."""
    model_name, config = VARIANTS[variant]
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir)
    trainer = peft_model(model_dir, config, extra_adapter=variant == "plain")
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine)
    sync()
    step(trainer)
    sync()
    result = verify(trainer, engine, probes)
    assert result.max_abs_diff <= 1e-4, result
    with trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-3


@pytest.mark.parametrize("model_name", ["qwen2", "gpt2"])
def test_streaming_merges_straight_into_vllm_parameters(tiny_model, engine_for, model_name, monkeypatch):
    """vLLM's loaders copy each merged weight into their own parameter, so the merge is written
    there in place: not one merged tensor is materialized on the way (the speed of a changed-only
    sync rests on it). A vLLM loader that reads the value otherwise shows up here, not as a slowdown."""
    materialized = []
    original = MergedWeight.materialize
    monkeypatch.setattr(MergedWeight, "materialize", lambda self: materialized.append(1) or original(self))
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir, "bfloat16")
    trainer = policy(model_dir, dtype="bfloat16", adapter_name="pol")
    sync = WeightSync(trainer, engine)
    sync()
    step(trainer)
    sync()
    assert verify(trainer, engine, probe_sequences(engine.vocab_size)).max_abs_diff <= TOLERANCES["bfloat16"]
    assert materialized == []
