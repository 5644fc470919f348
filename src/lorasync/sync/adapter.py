"""The `adapter` strategy's payload: the active adapter as PEFT saves it, checked servable.

Strategy `adapter` sends only the LoRA factors and the adapter's config (what Unsloth, verl and
prime-rl do); the engine serves them through vLLM's own LoRA support. Sync bytes are tiny, but
every decoded token pays for the unmerged adapter branch (`auto.py` weighs the two).

The trainer side here knows nothing of vLLM: it hands the engine PEFT's saved tensor names and
adapter_config.json content, checked first against what vLLM's LoRA can serve.
"""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from lorasync.served_model import EMBEDDING_MODULES
from lorasync.sync.policy import active_lora


def check_servable(model: PeftModel) -> tuple[str, LoraConfig]:
    """The active adapter's name and config; ValueError unless vLLM's LoRA can serve it.

    vLLM's rule (`vllm/lora/peft_helper.py`, `PEFTHelper._validate_features`): plain LoRA or
    rsLoRA factors, no DoRA, no LoRA bias, no full modules (modules_to_save, except a
    classifier head), no trainable tokens. And lorasync's engine keeps embeddings and the
    lm_head out of vLLM's LoRA (see `engines.vllm_compat.lora_args`), so LoRA on those is
    refused too. The fix is the merged strategy (`streaming`), which serves every PEFT LoRA
    variant.
    """
    name, config = active_lora(model)
    heads = sorted(
        {
            path.rsplit(".", 1)[-1]
            for path, module in model.named_modules()
            if isinstance(module, LoraLayer)
            and name in module.scaling
            and path.rsplit(".", 1)[-1] in EMBEDDING_MODULES
        }
    )
    unsupported = [
        label
        for label, used in (
            ("DoRA (use_dora=True)", config.use_dora),
            ("LoRA bias (lora_bias=True)", config.lora_bias),
            (f"modules_to_save={sorted(config.modules_to_save or [])}", config.modules_to_save),
            ("trainable tokens (trainable_token_indices)", config.trainable_token_indices),
            ("layer_replication", config.layer_replication),
            (f"LoRA on {heads}", heads),
        )
        if used
    ]
    if unsupported:
        raise ValueError(
            f"vLLM's LoRA support cannot serve adapter {name!r}: it uses "
            f"{', '.join(unsupported)}, and vLLM serves plain LoRA (or rsLoRA) factors on "
            "the blocks' linear layers only. Fix: sync with strategy='streaming', which "
            "merges every PEFT LoRA variant, or train without these options"
        )
    return name, config


def adapter_payload(model: PeftModel) -> tuple[dict[str, torch.Tensor], dict]:
    """The active adapter as PEFT saves it: LoRA factors by saved name, and its config as JSON.

    Raises ValueError (see `check_servable`) for adapters vLLM's LoRA cannot serve.
    """
    name, config = check_servable(model)
    tensors = get_peft_model_state_dict(model, adapter_name=name)
    # PEFT's config dict holds sets (target_modules) and enums; write it as save_pretrained
    # would, as JSON-ready values.
    config_json = json.loads(json.dumps(config.to_dict(), default=list))
    return {k: t.detach() for k, t in tensors.items()}, config_json
