"""The tiny-model factory builds real, loadable models of each architecture."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorasync.commands.tiny import ARCHITECTURES, TinyShape, make_tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_builds_loadable_model(tmp_path, arch, tied):
    out = make_tiny_model(tmp_path, arch=arch, tie_word_embeddings=tied)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] == tied
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
