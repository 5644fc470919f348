"""The tiny-model factory builds real, loadable models of each architecture."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasync.models.tiny import ARCHITECTURES, GEMMA3_SLIDING_WINDOW, TinyShape, make_tiny_model
from lorasync.sync.verify import probe_sequences


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_builds_loadable_model(tmp_path, arch, tied):
    out = make_tiny_model(tmp_path, arch=arch, tie_word_embeddings=tied)
    config = json.loads((out / "config.json").read_text())
    # Text-only Gemma 3 is `gemma3_text` (`gemma3` is the multimodal one)
    assert config["model_type"] in (arch, f"{arch}_text") and config["tie_word_embeddings"] == tied
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat 42.", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "the cat 42."
    assert model(ids).logits.shape[-1] == len(tokenizer)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied


def test_same_seed_same_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "b", seed=3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_head_dim_below_32_is_refused():
    with pytest.raises(ValueError, match="head_dim >= 32"):
        TinyShape(hidden_size=64, num_heads=4)


def test_unknown_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'gpt9'"):
        make_tiny_model(tmp_path, arch="gpt9")


def test_gemma3_is_text_only_with_sliding_and_full_layers(tmp_path):
    """What vLLM serves as its text-only Gemma 3 (architecture Gemma3ForCausalLM), with both
    kinds of attention layer, q/k norms, and a window shorter than verification's probes:
    the window changes the logprobs, so an engine that ignored it would fail parity."""
    out = make_tiny_model(tmp_path, arch="gemma3", tie_word_embeddings=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["head_dim"] >= 32
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert any(name.endswith("self_attn.q_norm.weight") for name, _ in model.named_parameters())
    probe = probe_sequences(len(AutoTokenizer.from_pretrained(out)), n=1)[0]
    assert len(probe) > GEMMA3_SLIDING_WINDOW
    ids = torch.tensor([probe])
    unwindowed = AutoModelForCausalLM.from_pretrained(out, sliding_window=len(probe)).eval()
    with torch.no_grad():
        assert (model(ids).logits - unwindowed(ids).logits).abs().max() > 1e-2


def test_phi3_checkpoint_holds_fused_projections(tmp_path):
    names = set(AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, arch="phi3")).state_dict())
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    modules = {name.rsplit(".", 2)[-2] for name in names}
    assert not modules & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
