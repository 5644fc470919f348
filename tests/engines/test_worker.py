"""What a vLLM worker runs for a sync (`engines/worker.py`), on a stand-in worker without vLLM:
the checkpoint-format tensors stream into vLLM's in-place reload one at a time (never listed
first), their count comes back, and a tied LM head is re-tied with the names that arrived, for
tied models only; the worker's fused modules are its model's. Real engines run these in
tests/sync/test_parity.py and tests/engines/test_readback.py."""

from types import SimpleNamespace

import pytest
import torch

from lorasync.engines import vllm_compat, worker


class Model(torch.nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def stand_in_worker(tied: bool):
    """A worker as `worker.py` reaches into it: its model runner (whose in-place reload records
    what it is given) and its model config; with the model and the record."""
    model, reloaded = Model(), []
    runner = SimpleNamespace(get_model=lambda: model, reload_weights=lambda weights_iterator: reloaded.extend(weights_iterator))
    text_config = SimpleNamespace(tie_word_embeddings=tied)
    config = SimpleNamespace(hf_config=SimpleNamespace(get_text_config=lambda: text_config))
    return SimpleNamespace(model_runner=runner, model_config=config), model, reloaded


@pytest.mark.parametrize("tied", [True, False])
def test_reload_loads_the_tensors_in_place_and_reties_a_tied_head(monkeypatch, tied):
    retied = []
    monkeypatch.setattr(vllm_compat, "retie_lm_head", lambda model, loaded: retied.append((model, set(loaded))))
    stand_in, model, reloaded = stand_in_worker(tied)
    weights = [("model.embed_tokens.weight", torch.ones(4, 2)), ("model.norm.weight", torch.zeros(2))]
    assert worker.reload(stand_in, iter(weights)) == 2
    assert [(n, t.tolist()) for n, t in reloaded] == [(n, t.tolist()) for n, t in weights]
    assert retied == ([(model, {"model.embed_tokens.weight", "model.norm.weight"})] if tied else [])


def test_the_tensors_reach_the_reload_as_the_sender_produces_them():
    produced, arrived = [], []

    def weights():
        for name in ["a.weight", "b.weight", "c.bias"]:
            produced.append(name)
            yield name, torch.zeros(1)

    def reload(stream):
        arrived.extend((name, len(produced)) for name, _ in stream)

    assert worker.reload_tensors(reload, Model(), False, weights()) == 3
    assert arrived == [("a.weight", 1), ("b.weight", 2), ("c.bias", 3)]  # one produced, one loaded


def test_the_workers_fused_modules_are_its_models():
    stand_in, _, _ = stand_in_worker(tied=False)
    assert worker.packed_modules(stand_in) == {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    stand_in.model_runner.get_model = torch.nn.Module  # a model that fuses nothing (gpt2)
    assert worker.packed_modules(stand_in) == {}
