"""Merging the LoRA delta into the weights the engine serves.

`merged` is the known recipe (Hugging Face TRL's): fold scale * B @ A into the base weights in
place, read them, fold it back out. The unmerge is guaranteed, whatever happens while merged,
so the trainer never continues on a merged model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel


@contextmanager
def merged(model: PeftModel) -> Iterator[PeftModel]:
    """Merge the active adapter into the base weights for the duration of the block."""
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
