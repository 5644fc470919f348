"""Adapter-only sync and the automatic choice between it and a merged sync.

Strategy `adapter` sends only the LoRA factors and the adapter's config (what Unsloth, verl and
prime-rl do); the engine serves them through vLLM's own LoRA support. Sync bytes are tiny, but
every decoded token pays for the unmerged adapter branch. Strategy `auto` measures both sides
on the engine at hand and picks the cheaper one for the expected generated tokens per step:

    cost(strategy) = sync_seconds(strategy) + tokens_per_step * decode_seconds_per_token(strategy)

The trainer side here knows nothing of vLLM: it hands the engine PEFT's saved tensor names and
adapter_config.json content, checked first against what vLLM's LoRA can serve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from lorasync.adapters import active_lora
from lorasync.engine import EMBEDDING_MODULES

if TYPE_CHECKING:
    from lorasync.sync import AdapterReceiver

# The merged strategy `auto` weighs against `adapter` (the default, changed-only one).
MERGED = "streaming"
ADAPTER = "adapter"


def check_servable(model: PeftModel) -> tuple[str, LoraConfig]:
    """The active adapter's name and config; ValueError unless vLLM's LoRA can serve it.

    vLLM's rule (`vllm/lora/peft_helper.py`, `PEFTHelper._validate_features`): plain LoRA or
    rsLoRA factors, no DoRA, no LoRA bias, no full modules (modules_to_save, except a
    classifier head), no trainable tokens. And lorasync's engine keeps embeddings and the
    lm_head out of vLLM's LoRA (see `ColocatedEngine._lora_args`), so LoRA on those is
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


@dataclass(frozen=True)
class Measurements:
    """Measured costs on one engine, keyed by strategy name (`streaming`, `adapter`)."""

    sync_seconds: Mapping[str, float]
    decode_seconds_per_token: Mapping[str, float]

    def to_dict(self) -> dict:
        return {k: dict(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    """Which strategy `auto` chose, and the numbers behind the choice."""

    strategy: str
    tokens_per_step: int
    seconds_per_step: Mapping[str, float]
    # Tokens per step above which merged is cheaper (0: always); None when merged decodes no
    # faster, so the sync cost alone decides.
    break_even_tokens: float | None
    measurements: Measurements

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "tokens_per_step": self.tokens_per_step,
            "seconds_per_step": dict(self.seconds_per_step),
            "break_even_tokens": self.break_even_tokens,
            "measurements": self.measurements.to_dict(),
        }


def choose_strategy(measurements: Measurements, tokens_per_step: int) -> Decision:
    """Pick the strategy with the lowest sync + decode seconds for `tokens_per_step` tokens.

    `tokens_per_step` is the number of tokens generated between two syncs (all rollouts of a
    step). Ties go to the merged strategy, whose decoding does not depend on adapter kernels.
    """
    if tokens_per_step < 0:
        raise ValueError(f"tokens_per_step must be >= 0, got {tokens_per_step}")
    sync, decode = measurements.sync_seconds, measurements.decode_seconds_per_token
    missing = {MERGED, ADAPTER} - (set(sync) & set(decode))
    if missing:
        raise ValueError(
            f"measurements lack {sorted(missing)}: both sync_seconds and "
            f"decode_seconds_per_token need {MERGED!r} and {ADAPTER!r}"
        )
    cost = {s: sync[s] + tokens_per_step * decode[s] for s in (MERGED, ADAPTER)}
    extra_decode = decode[ADAPTER] - decode[MERGED]
    break_even = (
        max(0.0, (sync[MERGED] - sync[ADAPTER]) / extra_decode) if extra_decode > 0 else None
    )
    return Decision(
        strategy=ADAPTER if cost[ADAPTER] < cost[MERGED] else MERGED,
        tokens_per_step=tokens_per_step,
        seconds_per_step=cost,
        break_even_tokens=break_even,
        measurements=measurements,
    )


def decode_seconds_per_token(
    engine: AdapterReceiver, prompts: Sequence[Sequence[int]], max_tokens: int, use_adapter: bool
) -> float:
    """Seconds per generated token for one greedy batch (tokens counted, as EOS may stop early)."""
    start = time.perf_counter()
    outputs = engine.generate(prompts, max_tokens, temperature=0.0, use_adapter=use_adapter)
    seconds = time.perf_counter() - start
    return seconds / max(1, sum(len(c.token_ids) for out in outputs for c in out))
