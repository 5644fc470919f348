"""What an engine holds, read back under checkpoint names (`engines/readback.py`): a fresh engine
reads back its checkpoint bit for bit, on whichever path this CPU takes (repacked kernels read
through identity rows, or plain weights: tests/engines/test_cpu_paths.py runs the other side),
and a stale packed copy of a tied head is seen."""

import pytest
import torch
from safetensors.torch import load_file

from lorasync.served_model import TIED_HEAD
from lorasync.engines import vllm_compat, worker
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import policy, train_step

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model_name", ["qwen2-tied", "llama", "gpt2"])
def test_a_fresh_engine_reads_back_its_checkpoint_bit_for_bit(tiny_model, engine_for, model_name, dtype):
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir, dtype)
    if engine.weight_version:
        pytest.skip("this session's engine was synced by an earlier test")
    checkpoint = {}
    for path in sorted(__import__("pathlib").Path(model_dir).glob("*.safetensors")):
        checkpoint |= load_file(path)
    seen = {}
    engine.read_back(lambda name, tensor: seen.setdefault(name, tensor.clone()))
    assert set(checkpoint) <= {n.removeprefix(TIED_HEAD) for n in seen}
    for name, tensor in seen.items():
        want = checkpoint[name.removeprefix(TIED_HEAD)].to(engine.dtype)
        assert tensor.shape == want.shape and torch.equal(tensor.to(want.dtype), want), name
    repacked = engine.llm.collective_rpc(worker.linear_weights_repacked)[0]
    print(f"{model_name} {dtype}: {len(seen)} tensors, linear weights repacked: {repacked}")


def test_a_tied_head_left_stale_by_the_reload_is_seen(tiny_model, engine_for, monkeypatch):
    """Without `retie_lm_head`, vLLM's reload leaves a tied head projecting with the old
    embedding where the CPU keeps a packed copy of it: the weight level names it."""
    model_dir = tiny_model("qwen2-tied")
    engine = engine_for(model_dir, "float32")
    trainer = policy(model_dir, adapter_name="tied", modules_to_save=["embed_tokens"])
    sync = WeightSync(trainer, engine)
    sync()
    assert check_weights(sync).ok
    if not engine.llm.collective_rpc(worker.linear_weights_repacked)[0]:
        pytest.skip("plain weights on this CPU: the head stays tied by itself (test_cpu_paths.py)")
    monkeypatch.setattr(vllm_compat, "retie_lm_head", lambda model, loaded: None)
    train_step(trainer)
    sync()
    check = check_weights(sync)
    assert not check.ok and check.first_mismatch == TIED_HEAD + "model.embed_tokens.weight", check
    monkeypatch.undo()
    sync.merged_synced = False  # send everything again, re-tied
    sync()
    assert check_weights(sync).ok
