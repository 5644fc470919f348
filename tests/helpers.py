"""Test helpers: a trainer policy with a random adapter, built in memory."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorasync.adapters import AdapterSpec, attach_random_adapter, randomize_trainable
from lorasync.engine import DTYPES


def policy(model_dir: str, dtype: str = "float32", **spec) -> torch.nn.Module:
    """The base model in `model_dir` with a random LoRA adapter described by `spec`."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return attach_random_adapter(base, AdapterSpec(**spec))


class Tap:
    """A real engine whose incoming weight stream passes through `transform` first.

    `transform(stream)` returns the stream the engine gets: tests use it to record, corrupt
    or break a sync on its way into real vLLM.
    """

    def __init__(self, engine, transform):
        self.engine = engine
        self.generate = engine.generate
        self.dtype = engine.dtype
        self.checkpoint_layout = engine.checkpoint_layout
        self.weight_groups = engine.weight_groups
        self.transform = transform

    def load_weights(self, weights):
        return self.engine.load_weights(self.transform(weights))


# vLLM's packed_modules_mapping for these architectures (the parity tests use the engine's own).
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

VARIANTS = {
    "plain": ("llama", dict(target_modules="all-linear")),
    "rslora": ("llama", dict(target_modules="all-linear", use_rslora=True)),
    "dora": ("llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    "lora-bias": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "fan-in-fan-out": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "embedding-lora": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "modules-to-save": ("llama", dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "trainable-tokens": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
    "tied-trainable-tokens": (
        "qwen2-tied", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])
    ),
}


def peft_model(model_dir, config, adapter="pol", extra_adapter=False):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, **config), adapter_name=adapter)
    if extra_adapter:  # a second adapter that must not leak into the served weights
        model.add_adapter("other", LoraConfig(r=4, **config))
        model.set_adapter(adapter)
        model.base_model.set_adapter(adapter)
    randomize_trainable(model, seed=0, std=0.05)
    for name, param in model.named_parameters():  # add_adapter trains both; only one is active
        if ".other" in name:
            param.requires_grad_(False)
    return model
