"""A checkpointed adapter is a plain PEFT adapter: vLLM's own OpenAI server loads it with
`--enable-lora --lora-modules` and serves the trainer's policy (logprob parity)."""

import os
import subprocess
import sys
import time

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorasync.commands.demo import demo_config
from lorasync.server.launch import free_port
from lorasync.sync.verify import probe_sequences, trainer_scores
from lorasync.train.trainer import GRPOTrainer

pytestmark = pytest.mark.vllm


def test_checkpoint_adapter_serves_from_vllm_openai_server(tmp_path, demo_base, engine_for):
    config = demo_config(tmp_path, steps=2)
    config.model.base = str(demo_base)
    trainer = GRPOTrainer(config, engine_for(str(demo_base)))
    trainer.train(progress=False)
    adapter = tmp_path / "checkpoints" / "step-000002" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_base),
         "--dtype", "float32", "--enable-lora", "--lora-modules", f"policy={adapter}",
         "--max-lora-rank", "16", "--max-model-len", "512", "--enforce-eager",
         "--host", "127.0.0.1", "--port", str(port)],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        import httpx
        from openai import OpenAI

        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up within 240 s"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        probes = probe_sequences(500, n=2, length=24)
        served = []
        for seq in probes:
            out = client.completions.create(model="policy", prompt=seq, echo=True, logprobs=0, max_tokens=1)
            served.append(out.choices[0].logprobs.token_logprobs[1 : len(seq)])
    finally:
        server.terminate()
        server.wait(timeout=60)

    base = AutoModelForCausalLM.from_pretrained(demo_base)
    reloaded = PeftModel.from_pretrained(base, adapter)
    expected = trainer_scores(reloaded, probes)
    live = trainer_scores(trainer.model, probes)
    assert max(abs(a - b) for s, e in zip(live, expected) for a, b in zip(s, e)) <= 1e-6
    diff = max(abs(a - b) for s, e in zip(served, expected) for a, b in zip(s, e))
    assert diff <= 1e-4, diff
