"""A checkpointed adapter is a plain PEFT adapter: vLLM's own OpenAI server loads it with
`--enable-lora --lora-modules` and serves the trainer's policy (logprob parity)."""

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasync.sync.verify import probe_sequences, trainer_scores
from tests.helpers import demo_trainer, lora_module_scores, max_diff

pytestmark = pytest.mark.vllm


def test_checkpoint_adapter_serves_from_vllm_openai_server(tmp_path, demo_base, engine_for):
    trainer = demo_trainer(demo_base, tmp_path, engine_for(str(demo_base)), steps=2)
    trainer.train(progress=False)
    adapter = tmp_path / "checkpoints" / "step-000002" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    probes = probe_sequences(500, n=2, length=24)
    served = lora_module_scores(demo_base, adapter, probes)
    base = AutoModelForCausalLM.from_pretrained(demo_base)
    reloaded = PeftModel.from_pretrained(base, adapter)
    expected = trainer_scores(reloaded, probes)
    live = trainer_scores(trainer.model, probes)
    assert max_diff(live, expected) <= 1e-6
    diff = max_diff(served, expected)
    assert diff <= 1e-4, diff
