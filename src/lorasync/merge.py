"""Merging the LoRA delta into the weights the engine serves, two ways.

- `merged`: the known recipe (Hugging Face TRL's): fold scale * B @ A into the base weights in
  place, read them, fold it back out. The unmerge is guaranteed, whatever happens while
  merged, so the trainer never continues on a merged model; but in low precision the round
  trip drifts the frozen base weights.
- `merged_tensor`: the streaming merge. It computes one merged tensor into a temporary and
  leaves the model untouched, so the base weights stay bit-identical after any number of syncs.
  For plain LoRA on linear layers it is one fused `addmm` in the weight's dtype; everything
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

from lorasync.plan import Entry, Source


@contextmanager
def merged(model: PeftModel) -> Iterator[PeftModel]:
    """Merge the active adapter into the base weights for the duration of the block."""
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


class ScratchPool:
    """Output buffers for merged tensors, handed out again once nothing else holds them.

    A receiver may keep a sent tensor for a while (vLLM's layerwise reload holds q, k and v
    until all three have arrived), so a buffer is reused only when no tensor but the pool's
    own refers to its memory. After the first sync the pool holds a handful of tensors and a
    sync allocates none (on the 0.5B shape, five syncs in a row peaked 0-34 MB above their
    start with reuse, 0-70 MB with fresh temporaries; the time was the same).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, list[torch.Tensor]] = {}

    def like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A free buffer with the shape, dtype and device of `tensor`.

        Each hand-out is a new view of the pool's buffer, so whoever still holds one (or a
        view of it) shows in the storage's use count; holding the same tensor object would not.
        """
        buffers = self._buffers.setdefault((tensor.shape, tensor.dtype, tensor.device), [])
        free = [
            buffer
            for buffer in buffers
            # 2: the pool's own tensor and the storage handle made to ask
            if torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2
        ]
        if not free:
            free.append(torch.empty_like(tensor))
            buffers.append(free[0])
        return free[0].view(tensor.shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bs in self._buffers.values() for b in bs)


@torch.no_grad()
def merged_tensor(
    model: PeftModel, entry: Entry, adapter_name: str, scratch: ScratchPool | None = None
) -> torch.Tensor:
    """The served value of one planned tensor, as a new tensor when it needs a merge (in a
    buffer of `scratch` on the fused path, when given)."""
    if entry.source is Source.PARAM:
        return model.get_parameter(entry.path).detach()
    layer = model.get_submodule(entry.path)
    if entry.source is Source.TOKENS:
        return layer.get_merged_weights([adapter_name]).detach()
    base = layer.get_base_layer()
    if entry.source is Source.LORA_BIAS:
        return base.bias + layer.lora_B[adapter_name].bias * layer.scaling[adapter_name]
    if adapter_name in layer.lora_variant:  # DoRA and other variants merge their own way
        return layer.lora_variant[adapter_name].merge_safe(layer, adapter_name, base.weight.clone())
    if isinstance(layer, LoraLinear):
        # PEFT's path (float32 delta, then a mixed-precision in-place add into a clone) runs
        # 4-8x slower on CPU in bf16 than this fused multiply-add, which also rounds once.
        weight = base.weight.detach()
        lora_a = layer.lora_A[adapter_name].weight.to(weight.dtype)
        lora_b = layer.lora_B[adapter_name].weight.to(weight.dtype)
        scale = layer.scaling[adapter_name]
        out = scratch.like(weight) if scratch is not None else None
        if layer.fan_in_fan_out:  # GPT-2 Conv1D stores the weight as (in, out)
            return torch.addmm(weight, lora_a.T, lora_b.T, alpha=scale, out=out)
        return torch.addmm(weight, lora_b, lora_a, alpha=scale, out=out)
    weight = base.weight.detach().clone()
    # `+=` on the clone is what PEFT's merge does on the weight itself (float32 delta added
    # into a low-precision weight rounds once), so both give the same bits.
    weight += layer.get_delta_weight(adapter_name)
    return weight
