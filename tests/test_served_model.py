"""The served checkpoint as `served_model.py` reads it, without loading a model: names, shapes
and the file of each tensor from safetensors headers (a folder without any is refused with what
to pass); the groups vLLM loads together (a module's weight and bias; q/k/v and gate/up fused,
per layer); the block linears an adapter-serving engine targets (no embeddings, heads or
norms); a KV cache's bytes per token from config.json; and the dtype names."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lorasync.served_model import (
    DTYPES,
    block_linears,
    check_dtype,
    checkpoint_index,
    checkpoint_layout,
    dtype_name,
    kv_bytes_per_token,
    weight_groups,
)
from tests.helpers import PACKED

ATTN, MLP = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
# A two-layer llama-like checkpoint's layout, in checkpoint order (q_proj with a bias).
LAYOUT = {"model.embed_tokens.weight": (32, 8)}
for i in range(2):
    LAYOUT |= {
        f"model.layers.{i}.input_layernorm.weight": (8,),
        ATTN.format(i) + "q_proj.weight": (8, 8),
        ATTN.format(i) + "q_proj.bias": (8,),
        ATTN.format(i) + "k_proj.weight": (4, 8),
        ATTN.format(i) + "v_proj.weight": (4, 8),
        ATTN.format(i) + "o_proj.weight": (8, 8),
        MLP.format(i) + "gate_proj.weight": (16, 8),
        MLP.format(i) + "up_proj.weight": (16, 8),
        MLP.format(i) + "down_proj.weight": (8, 16),
    }
LAYOUT |= {"model.norm.weight": (8,), "lm_head.weight": (32, 8)}


def test_fused_modules_and_each_modules_weight_and_bias_load_together_per_layer():
    groups = weight_groups(LAYOUT, PACKED)
    assert [n for g in groups for n in g] == list(LAYOUT)  # every name once, in layout order
    for i in range(2):
        attn, mlp = ATTN.format(i), MLP.format(i)
        assert [attn + "q_proj.weight", attn + "q_proj.bias", attn + "k_proj.weight", attn + "v_proj.weight"] in groups
        assert [mlp + "gate_proj.weight", mlp + "up_proj.weight"] in groups
        assert [attn + "o_proj.weight"] in groups
    assert len(groups) == 1 + 2 * 5 + 2
    # a model that fuses nothing (gpt2): one group per module, its bias with its weight
    unfused = weight_groups(LAYOUT, {})
    assert len(unfused) == 1 + 2 * 8 + 2 and [ATTN.format(0) + "q_proj.weight", ATTN.format(0) + "q_proj.bias"] in unfused


def test_block_linears_leave_out_embeddings_heads_and_norms():
    assert block_linears(LAYOUT) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    gpt2 = {"transformer.wte.weight": (32, 8), "transformer.wpe.weight": (16, 8),
            "transformer.h.0.attn.c_attn.weight": (8, 24), "transformer.h.0.ln_1.weight": (8,)}
    assert block_linears(gpt2) == ["c_attn"]


def test_the_layout_is_read_from_every_safetensors_file_and_a_folder_without_one_is_refused(tmp_path):
    save_file({"a.weight": torch.zeros(2, 3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(4), "b.bias": torch.zeros(4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    layout, where = checkpoint_index(tmp_path)
    assert layout == {"a.weight": (2, 3), "b.weight": (4,), "b.bias": (4,)} == checkpoint_layout(tmp_path)
    assert {n: p.name for n, p in where.items()} == {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "b.bias": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files in .*save_pretrained writes one"):
        checkpoint_layout(tmp_path / "empty")


def test_kv_bytes_per_token_count_key_value_heads_in_every_layer(tmp_path):
    def config(**fields):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(fields))
        return folder

    # grouped-query attention: 2 layers x (keys, values) x 2 kv heads x head size 64 / 4 x 4 bytes
    llama = config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    assert kv_bytes_per_token(llama, "float32") == 2 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(llama, "bfloat16") == 2 * 2 * 2 * 16 * 2
    # an explicit head_dim, under a multimodal model's text_config
    nested = config(text_config=dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                     hidden_size=64, head_dim=32))
    assert kv_bytes_per_token(nested, "float16") == 3 * 2 * 1 * 32 * 2
    # gpt2's names: every head holds keys and values
    assert kv_bytes_per_token(config(n_layer=3, n_head=4, n_embd=32), "float32") == 3 * 2 * 4 * 8 * 4


def test_dtype_names_go_both_ways_and_others_are_refused_with_the_choices():
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name and check_dtype(name, "x") is dtype
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtype_name(torch.int8)
    with pytest.raises(ValueError, match="engine.dtype must be one of float32, bfloat16, float16, got 'int8'"):
        check_dtype("int8", "engine.dtype")
