"""The served checkpoint: its tensor names and shapes, how vLLM groups them, and the dtypes.

Read once per engine (colocated, remote server, TRL's) and by the trainer's side of a sync,
which plans against it. Only safetensors headers are read here, never tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

# The dtypes lorasync trains, serves and sends in, by the names configs and the CLI use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint module names of embeddings and output heads: never LoRA targets in vLLM here.
EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe"})

# The name a tied LM head's weight is read back under (`engines/readback.py`): this prefix and
# the input embedding's checkpoint name, whose value it must hold.
TIED_HEAD = "lm_head<-"

Layout = Mapping[str, tuple[int, ...]]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of one of DTYPES ("bfloat16" for torch.bfloat16); ValueError for others."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")


def check_dtype(name: str, where: str) -> torch.dtype:
    """The torch dtype called `name`; ValueError naming `where` and the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{where} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def checkpoint_index(model_dir: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    """Names and shapes of a model folder's safetensors tensors, and the file holding each
    (headers only)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {str(model_dir)!r}: lorasync needs the model as a "
            "local folder of safetensors files (save_pretrained writes one)"
        )
    layout: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                layout[name] = tuple(f.get_slice(name).get_shape())
                where[name] = path
    return layout, where


def checkpoint_layout(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a model folder's safetensors files (headers only)."""
    return checkpoint_index(model_dir)[0]


def weight_groups(layout: Layout, packed_modules: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Group checkpoint names by the vLLM module they load into, in layout order.

    A module's weight and bias form one group (vLLM's layerwise reload processes a layer once
    all its elements arrived); modules vLLM fuses (`packed_modules_mapping`, e.g. q/k/v into
    qkv_proj) form one group together.
    """
    fused_into = {part: fused for fused, parts in packed_modules.items() for part in parts}
    groups: dict[str, list[str]] = {}
    for name in layout:
        module, _, _ = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        key = f"{parent}.{fused_into[leaf]}" if leaf in fused_into else module
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def block_linears(layout: Layout) -> list[str]:
    """Names of the 2-D weight modules of the blocks (no embeddings or heads): vLLM's LoRA
    targets for an engine that serves adapters."""
    linears = {
        name.rsplit(".", 2)[-2]
        for name, shape in layout.items()
        if name.endswith(".weight") and len(shape) == 2
    }
    return sorted(linears - EMBEDDING_MODULES)


def kv_bytes_per_token(model_dir: str | Path, dtype: str) -> int:
    """The bytes of keys and values one token holds in an engine's cache, from the model's
    config.json: layers x 2 x key-value heads x head size x the dtype's bytes (full attention
    in every layer: an upper bound for sliding-window layers)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return layers * 2 * kv_heads * head_dim * DTYPES[dtype].itemsize
