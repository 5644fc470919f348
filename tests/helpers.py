"""Test helpers: a trainer policy with a random adapter, built in memory."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lorasync.adapters import AdapterSpec, attach_random_adapter
from lorasync.engine import DTYPES


def policy(model_dir: str, dtype: str = "float32", **spec) -> torch.nn.Module:
    """The base model in `model_dir` with a random LoRA adapter described by `spec`."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return attach_random_adapter(base, AdapterSpec(**spec))
