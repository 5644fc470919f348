"""The sync's CPU-dependent paths on the side this machine does not take by itself.

Where vLLM's CPU backend can build a prepacked kernel (oneDNN handle, AMX, zentorch) it swaps
each linear layer's weight, and the tied lm_head keeps a packed copy of its weight for the
logits GEMM; where it cannot (bf16 on a CPU without AVX-512), the plain weights stay
(`vllm_compat.linear_weights_repacked`). The sync goes through both: vLLM's layerwise reload,
and `vllm_compat.retie_lm_head` when a tied embedding was trained. The native side runs in
tests/sync/test_parity.py; here a subprocess with torch's and oneDNN's ISA capped at AVX2
(and torch's AMX probes answering no, which the cap does not reach) takes the other (only
bf16 does: float32 is prepacked there too, measured), and must still serve the trainer's policy, trained embedding and tied head included, and read back bit for bit
at the weight level (`engines/readback.py` reads plain weights here, kernels on the other side). Audit finding: on this
side the head stays tied through the reload by itself (with `retie_lm_head` removed the gap is
still 0), so the re-tie is needed, and pinned, on the prepacked side only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

CHECK = """
import json, sys
import torch

# The cap above reaches torch's and oneDNN's kernels, not torch's AMX probe, which vLLM asks to
# pick its prepacked kernel: on an AMX CPU it would pick it and torch's capped brgemm would abort.
# A CPU without AVX-512 has no AMX either; this runs again in every process vLLM spawns.
torch.cpu._is_amx_tile_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False

from lorasync.engines import worker
from lorasync.engines.colocated import ColocatedEngine, EngineConfig
from lorasync.sync.verify import probe_sequences, verify
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import policy, train_step

def tie_gap(w):  # largest |lm_head - embedding| in the served model: 0 while tied
    model = w.model_runner.get_model()
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    return (head.float() - embed.float()).abs().max().item()


if __name__ == "__main__":
    model_dir = sys.argv[1]
    engine = ColocatedEngine(EngineConfig(model=model_dir, dtype=sys.argv[2]))
    try:
        repacked = engine.llm.collective_rpc(worker.linear_weights_repacked)
        trainer = policy(model_dir, dtype=sys.argv[2], adapter_name="pol", modules_to_save=["embed_tokens"])
        probes = probe_sequences(engine.vocab_size)
        sync = WeightSync(trainer, engine)
        sync()
        train_step(trainer)
        sync()
        after = verify(trainer, engine, probes).max_abs_diff
        weights = check_weights(sync).to_dict()
        gap = engine.llm.collective_rpc(tie_gap)
        with trainer.disable_adapter():
            base = verify(trainer, engine, probes).max_abs_diff
    finally:
        engine.close()
    print("RESULT " + json.dumps({"repacked": repacked, "diff": after, "base_diff": base, "tie_gap": gap, "weights": weights}))
"""


def test_tied_model_with_trained_embedding_in_bfloat16_without_prepacked_kernels(tiny_model, tmp_path):
    from lorasync.sync.verify import TOLERANCES

    model_dir = tiny_model("qwen2-tied")
    root = str(Path(__file__).parents[2])
    env = {**os.environ, **AVX2_CAP, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": root}
    script = tmp_path / "check.py"  # a file, not -c: vLLM's spawned processes re-import it
    script.write_text(CHECK)
    run = subprocess.run(
        [sys.executable, str(script), model_dir, "bfloat16"], env=env, cwd=root, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert not any(result["repacked"]), result  # the other side: plain weights, loaders kept
    assert result["tie_gap"] == [0.0], result  # the head projects with the trained embedding
    assert result["diff"] <= TOLERANCES["bfloat16"], result
    assert result["base_diff"] > 10 * result["diff"], result  # the policy is far from the base
    # the weight level reads the plain weights on this side, the tied head included, bit for bit
    weights = result["weights"]
    assert weights["ok"] and weights["exact"] and weights["unread"] == 0, weights
