"""The `factors` strategy's payload: per changed tensor, the LoRA factors the engine merges.

What makes server mode cheap: per adapted module the trainer sends B, A and the scale (about
1-2% of the merged tensors' bytes) and the server merges them into its pristine base weights
(`server/serve/receiver.py`). Tensors that cannot be sent as factors go whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lorasync.sync.base import Record
from lorasync.sync.merge import Merger
from lorasync.sync.plan import Source, SyncPlan


def lora_records(merger: Merger, plan: SyncPlan, dtype: torch.dtype) -> Iterator[Record]:
    """What one factor sync sends for `plan.changed`: factors where possible, else tensors.

    Plain LoRA on a linear layer becomes (B, A, scale) in the checkpoint tensor's orientation
    (GPT-2's Conv1D stores W as (in, out), so its factors go transposed and swapped).
    modules_to_save copies, trainable tokens, LoRA biases and variants with their own merge
    (DoRA) go as merged tensors. Frozen base tensors that only complete a fused group are not
    sent at all: the server has them.
    """
    for entry in plan.changed:
        if entry.source is Source.PARAM and "modules_to_save" not in entry.path.split("."):
            continue
        factors = merger.factors(entry)
        if factors is not None:
            b, a, scale = factors
            yield Record(entry.checkpoint, (b.to(dtype), a.to(dtype)), scale)
        else:
            yield Record(entry.checkpoint, (merger(entry).to(dtype),))
