"""Map PEFT parameter names to the checkpoint names vLLM loads.

A PeftModel's `named_parameters()` decorates each Hugging Face checkpoint name with PEFT's
wrappers (and, under FSDP or activation checkpointing, with torch's). vLLM's `load_weights`
takes plain checkpoint names (`model.layers.0.self_attn.q_proj.weight`) and does the fusing
itself, so the sync needs exactly one thing from this module: undo the decoration, or say that
a tensor has no place in the served model. The rules are listed in `served_name`.
"""

from __future__ import annotations

import re

PEFT_PREFIX = "base_model.model."
# Segments that torch wrappers insert into names and that vLLM's checkpoints never contain.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# PEFT's LoRA tuner prefix: lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector (DoRA).
LORA_PREFIX = "lora_"
# Segments of PEFT's wrappers around a base layer, removed like `base_layer`.
LAYER_WRAPPERS = ("base_layer", "token_adapter")
# Trainable-token rows; the merge writes them into the embedding weight.
TOKEN_DELTA = "trainable_tokens_delta"
# Adapter names become folder names (the engine's served adapters, PEFT's saved adapters):
# letters, digits, `_` and `-`. No dot: PEFT refuses it (a module key), and alone it would
# make `.` or `..`; no `/`; at most 64 characters.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_adapter_name(name: str, field: str = "adapter name") -> str:
    """`name`, or ValueError naming `field` and the rule, before it becomes a path."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"{field} must be 1-64 letters, digits, '_' or '-' (it becomes a folder name), "
            f"got {name!r}: rename the adapter, e.g. 'policy'"
        )
    return name


def _strip(name: str) -> list[str]:
    """Drop torch wrapper segments, PEFT's outer prefix and layer wrappers; return segments."""
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    joined = ".".join(parts)
    if joined.startswith(PEFT_PREFIX):
        joined = joined[len(PEFT_PREFIX) :]
    return [p for p in joined.split(".") if p not in LAYER_WRAPPERS]


def _is_adapter_tensor(parts: list[str]) -> bool:
    return TOKEN_DELTA in parts or any(p.startswith(LORA_PREFIX) for p in parts)


def served_name(name: str, adapter_name: str) -> str | None:
    """The checkpoint name under which this parameter's value is served, or None to skip it.

    Rules, in order:
    - torch's FSDP and activation-checkpoint wrapper segments are removed;
    - a leading `base_model.model.` is removed, and every `.base_layer` and `.token_adapter`
      segment (the layers PEFT wraps around a LoRA or trainable-tokens base layer);
    - LoRA tensors (`lora_*`) and trainable-token rows are skipped: the merge folds them into
      the weight;
    - `original_module` copies are skipped: the trained copy replaces them;
    - `modules_to_save.<adapter_name>.` is unwrapped (the trained copy takes the base name);
      another adapter's `modules_to_save` copy is skipped.
    """
    parts = _strip(name)
    if _is_adapter_tensor(parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if i + 1 >= len(parts) or parts[i + 1] != adapter_name:
            return None
        del parts[i : i + 2]
    return ".".join(parts)


def base_name(name: str) -> str | None:
    """The checkpoint name of a frozen base weight, or None for adapter-owned tensors.

    The base weight of a module wrapped by `modules_to_save` is its `original_module` copy.
    """
    parts = _strip(name)
    if _is_adapter_tensor(parts) or "modules_to_save" in parts:
        return None
    return ".".join(p for p in parts if p != "original_module")
