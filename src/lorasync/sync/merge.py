"""Merging the LoRA delta into the weights the engine serves, two ways.

- `merged`: the known recipe (Hugging Face TRL's): fold scale * B @ A into the base weights in
  place, read them, fold it back out. The unmerge is guaranteed, whatever happens while
  merged, so the trainer never continues on a merged model; but in low precision the round
  trip drifts the frozen base weights.
- `Merger`: the streaming merge. It gives one merged tensor at a time and leaves the
  model untouched, so the base weights stay bit-identical after any number of syncs. For plain
  LoRA on linear layers it is one fused multiply-add (`merge_kernel.py`), computed straight into
  the engine's parameter when the engine copies it there (`MergedWeight`); everything
  else (DoRA and other variants, embeddings, trainable tokens) uses PEFT's own arithmetic
  (`get_delta_weight`, the variants' `merge_safe`, `get_merged_weights`). Either way the result
  matches what `merge_and_unload` gives (bit for bit on PEFT's path, to float rounding on the
  fused one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear

from lorasync.sync.merge_kernel import Kernel
from lorasync.sync.merged_weight import MergedWeight
from lorasync.sync.plan import Entry, Source


@contextmanager
def merged(model: PeftModel) -> Iterator[PeftModel]:
    """Merge the active adapter into the base weights for the duration of the block."""
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


class Merger:
    """The served value of each planned tensor of one model: `merger(entry)`.

    A tensor that needs a merge is a new tensor, or for plain LoRA on a linear layer a
    `MergedWeight`, merged where it is copied to. Each entry's module is looked up once: PEFT's
    nested `__getattr__` made the lookups 40% of the trainer's side of a sync (15 of 35 ms on
    the 0.5B shape).
    """

    def __init__(self, model: PeftModel, adapter_name: str, kernel: Kernel = Kernel.ADDMM) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.kernel = kernel
        self._found: dict[str, torch.nn.Module] = {}

    def find(self, entry: Entry):
        """The parameter (`Source.PARAM`) or module an entry is made from. A parameter is read
        from its (cached) module each time, never cached itself: a module's parameters can be
        swapped (FSDP2's gathered whole tensors for a sync, `train/rank_sync.gathered`), and a
        cached one would send a stale value (tests/train/test_rank_sync.py, the factors test)."""
        if entry.source is Source.PARAM:
            owner, _, name = entry.path.rpartition(".")
            return getattr(self._module(owner), name)
        return self._module(entry.path)

    def _module(self, path: str) -> torch.nn.Module:
        found = self._found.get(path)
        if found is None:
            found = self._found[path] = self.model.get_submodule(path)
        return found

    def factors(self, entry: Entry) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(L, R, scale) with W + scale * L @ R the entry's served weight, in W's own layout,
        when it is plain LoRA on a linear layer; else None. GPT-2's Conv1D stores W as
        (in, out), so its factors come transposed and swapped."""
        if entry.source is not Source.LORA_WEIGHT:
            return None
        layer, adapter_name = self.find(entry), self.adapter_name
        if not isinstance(layer, LoraLinear) or adapter_name in layer.lora_variant:
            return None  # DoRA and other variants merge their own way
        a = layer.lora_A[adapter_name].weight.detach()
        b = layer.lora_B[adapter_name].weight.detach()
        scale = float(layer.scaling[adapter_name])
        return (a.T, b.T, scale) if layer.fan_in_fan_out else (b, a, scale)

    @torch.no_grad()
    def __call__(self, entry: Entry) -> torch.Tensor:
        adapter_name = self.adapter_name
        factors = self.factors(entry)
        if factors is not None:
            # PEFT's path (float32 delta, then a mixed-precision in-place add into a clone) runs
            # 4-8x slower on CPU in bf16 than this fused multiply-add, which also rounds once.
            weight = self.find(entry).get_base_layer().weight.detach()
            return MergedWeight(weight, *factors, self.kernel)
        if entry.source is Source.PARAM:
            return self.find(entry).detach()
        layer = self.find(entry)
        if entry.source is Source.TOKENS:
            return layer.get_merged_weights([adapter_name]).detach()
        base = layer.get_base_layer()
        if entry.source is Source.LORA_BIAS:
            return base.bias + layer.lora_B[adapter_name].bias * layer.scaling[adapter_name]
        if adapter_name in layer.lora_variant:  # DoRA and other variants merge their own way
            return layer.lora_variant[adapter_name].merge_safe(layer, adapter_name, base.weight.clone())
        weight = base.weight.detach().clone()
        # `+=` on the clone is what PEFT's merge does on the weight itself (float32 delta added
        # into a low-precision weight rounds once), so both give the same bits.
        weight += layer.get_delta_weight(adapter_name)
        return weight
