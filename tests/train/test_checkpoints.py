"""A checkpointed adapter is a plain PEFT adapter: vLLM's own OpenAI server loads it with
`--enable-lora --lora-modules` and serves the trainer's policy (logprob parity)."""

import os
import subprocess
import sys

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasync.commands.demo import demo_config
from lorasync.server.launch import free_port, wait_healthy
from lorasync.sync.verify import probe_sequences, trainer_scores
from lorasync.train.trainer import GRPOTrainer
from tests.helpers import max_diff, openai_scores

pytestmark = pytest.mark.vllm


def test_checkpoint_adapter_serves_from_vllm_openai_server(tmp_path, demo_base, engine_for):
    config = demo_config(tmp_path, steps=2)
    config.model.base = str(demo_base)
    trainer = GRPOTrainer(config, engine_for(str(demo_base)))
    trainer.train(progress=False)
    adapter = tmp_path / "checkpoints" / "step-000002" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # vLLM's own server, not lorasync's: the adapter is a plain PEFT adapter
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_base),
         "--dtype", "float32", "--enable-lora", "--lora-modules", f"policy={adapter}",
         "--max-lora-rank", "16", "--max-model-len", "512", "--enforce-eager",
         "--host", "127.0.0.1", "--port", str(port)],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    probes = probe_sequences(500, n=2, length=24)
    try:
        wait_healthy(url, server, timeout=240)
        served = openai_scores(url, probes, token="unused", model="policy")
    finally:
        server.terminate()
        server.wait(timeout=60)

    base = AutoModelForCausalLM.from_pretrained(demo_base)
    reloaded = PeftModel.from_pretrained(base, adapter)
    expected = trainer_scores(reloaded, probes)
    live = trainer_scores(trainer.model, probes)
    assert max_diff(live, expected) <= 1e-6
    diff = max_diff(served, expected)
    assert diff <= 1e-4, diff
