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


class Tap:
    """A real engine whose incoming weight stream passes through `transform` first.

    `transform(stream)` returns the stream the engine gets: tests use it to record, corrupt
    or break a sync on its way into real vLLM.
    """

    def __init__(self, engine, transform):
        self.engine = engine
        self.dtype = engine.dtype
        self.checkpoint_layout = engine.checkpoint_layout
        self.weight_groups = engine.weight_groups
        self.transform = transform

    def load_weights(self, weights):
        return self.engine.load_weights(self.transform(weights))
