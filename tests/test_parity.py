"""After a sync, real vLLM serves the trainer's policy: per-token logprobs match in float32."""

import pytest

from helpers import policy
from lorasync.sync import WeightSync
from lorasync.verify import probe_sequences, verify

pytestmark = pytest.mark.vllm

ADAPTERS = {
    "all-linear": dict(targets=["all-linear"]),
    "q-v-only": dict(targets=["q_proj", "v_proj"]),
    "save-embed": dict(targets=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    "save-lm-head": dict(targets=["all-linear"], modules_to_save=["lm_head"]),
}
CASES = [
    (model, adapter)
    for model in ("qwen2-tied", "llama", "qwen3")
    for adapter in ADAPTERS
    # A tied model has no separate lm_head to train; its embedding case covers both.
    if not (model == "qwen2-tied" and adapter == "save-lm-head")
]


@pytest.mark.parametrize("model_name,adapter", CASES)
def test_parity_after_sync_float32(tiny_model, engine_for, model_name, adapter):
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir)
    trainer = policy(model_dir, adapter_name="policy_v1", **ADAPTERS[adapter])
    probes = probe_sequences(engine.vocab_size)

    report = WeightSync(trainer, engine)()

    result = verify(trainer, engine, probes)
    assert result.max_abs_diff <= 1e-4, result
    assert report.version == engine.weight_version
    assert report.tensors_sent == len(engine.checkpoint_layout())
    # The adapter moved the policy far from the base: parity is not trivially true.
    with trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-2
