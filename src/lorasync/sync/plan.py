"""Plan what a sync sends: which checkpoint tensors, made from which trainer tensors, in what order.

The plan is computed once per (trainer model, engine) pair and checked against the engine's
checkpoint layout before anything is merged or sent, so a mismatched engine fails fast with
nothing changed on either side. It holds two lists:
- `full`: every served tensor (a first sync, or the merge-unmerge recipe);
- `changed`: only what the adapter changes (adapted modules, modules_to_save, trainable
  tokens), completed to whole groups the engine fuses (q/k/v, gate/up), which vLLM's in-place
  reload needs complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens import TrainableTokensLayer

from lorasync.served_model import Layout
from lorasync.sync.naming import served_name
from lorasync.sync.policy import active_lora


class Source(Enum):
    """How the trainer makes one served tensor."""

    PARAM = "param"  # a parameter as it is (frozen base, or a modules_to_save copy)
    LORA_WEIGHT = "lora_weight"  # base weight of a LoRA layer with the adapter merged in
    LORA_BIAS = "lora_bias"  # base bias of a LoRA layer with lora_bias merged in
    TOKENS = "tokens"  # embedding weight with the trainable token rows written in


@dataclass(frozen=True)
class Entry:
    """One served tensor: its checkpoint name, how to make it, and from what.

    `path` is a parameter name for Source.PARAM and a module path otherwise; `param` is the
    parameter name the merge-unmerge recipe reads after merging in place.
    """

    checkpoint: str
    source: Source
    path: str
    param: str


@dataclass(frozen=True)
class SyncPlan:
    adapter_name: str
    full: tuple[Entry, ...]
    changed: tuple[Entry, ...]


def _served_params(model: PeftModel, adapter_name: str, layout: Layout) -> dict[str, str]:
    """checkpoint name -> trainer parameter name for every served tensor, checked."""
    served: dict[str, str] = {}
    unknown: dict[str, torch.nn.Parameter] = {}
    mismatched: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        ckpt = served_name(name, adapter_name)
        if ckpt is None:
            continue
        if ckpt not in layout:
            unknown[ckpt] = param
        elif tuple(param.shape) != layout[ckpt]:
            mismatched.append(f"{ckpt}: trainer {tuple(param.shape)}, engine {layout[ckpt]}")
        else:
            served[ckpt] = name
    # A tied duplicate (lm_head of a tied model) is fine when the very same trainer tensor is
    # served under a name the engine holds: vLLM ties the two the same way.
    held = {id(model.get_parameter(name)) for name in served.values()}
    unknown = {ckpt: p for ckpt, p in unknown.items() if id(p) not in held}
    if list(unknown) == ["lm_head.weight"]:
        raise ValueError(
            "the engine's model ties lm_head to embed_tokens, but the trainer's lm_head "
            "is a separate tensor (modules_to_save on a tied embedding without weight "
            "tying); vLLM cannot serve that policy. Fix: LoraConfig(ensure_weight_tying="
            "True) or a base model with tie_word_embeddings=False"
        )
    missing = sorted(set(layout) - set(served))
    if unknown or mismatched or missing:
        problems = []
        for label, items in (
            ("names unknown to the engine", list(unknown)),
            ("shape mismatches", mismatched),
            ("engine weights the trainer lacks", missing),
        ):
            if items:
                problems.append(f"{len(items)} {label} (first: {items[0]})")
        raise ValueError(
            "the engine's model is not the trainer's base model: "
            + "; ".join(problems)
            + ". Build the engine from the base model the adapter was trained on"
        )
    return served


def _merge_sources(model: PeftModel, adapter_name: str, served: dict[str, str]) -> dict[str, Entry]:
    """Entries for tensors the adapter changes through a merge, keyed by checkpoint name."""
    param_names = {id(p): n for n, p in model.named_parameters()}
    shared_by: dict[int, int] = {}  # how many modules hold each parameter (2: a tied embedding)
    for _, p in model.named_parameters(remove_duplicate=False):
        shared_by[id(p)] = shared_by.get(id(p), 0) + 1
    by_param = {param: ckpt for ckpt, param in served.items()}
    merges: dict[str, Entry] = {}

    def add(tensor, source: Source, path: str) -> None:
        param = param_names[id(tensor)]
        if param in by_param:  # a tied duplicate the engine does not hold has no entry
            merges[by_param[param]] = Entry(by_param[param], source, path, param)

    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            base = module.get_base_layer()
            if shared_by[id(base.weight)] > 1:
                _refuse_lora_on_tied(model, adapter_name, path)
            add(base.weight, Source.LORA_WEIGHT, path)
            if module.lora_bias.get(adapter_name, False):
                add(base.bias, Source.LORA_BIAS, path)
        elif isinstance(module, TrainableTokensLayer) and adapter_name in module.token_indices:
            add(module.base_layer.weight, Source.TOKENS, path)
    return merges


def _refuse_lora_on_tied(model: PeftModel, adapter_name: str, path: str) -> None:
    """ValueError: LoRA on a weight the base model ties (embedding and lm_head) cannot be served.

    The trainer adds the LoRA branch where the module is called, on one side of the tie only
    (or, with ensure_weight_tying, a separate branch on each side), while the tied engine holds
    one matrix for both: a merged sync changes the lm_head's logits too, and PEFT's own merge
    adds both branches into the one tensor. No strategy serves that policy; the tied model's
    embedding trains fine as modules_to_save or trainable tokens, which stay tied.
    """
    arch = type(model.get_base_model()).__name__
    module = path.removeprefix("base_model.model.")
    raise ValueError(
        f"{arch} ties its lm_head to its input embedding (tie_word_embeddings), and adapter "
        f"{adapter_name!r} puts LoRA on the tied weight ({module}): the trainer applies LoRA "
        "per module, but vLLM serves one matrix as both the embedding and the lm_head, so no "
        "sync can serve this policy. Fix: train the embedding with modules_to_save=['embed_tokens'] "
        "(LoraConfig(ensure_weight_tying=True)) or trainable_token_indices, or start from a "
        "base model with tie_word_embeddings=False"
    )


def plan_sync(model: PeftModel, layout: Layout, groups: Sequence[Sequence[str]]) -> SyncPlan:
    """Plan full and changed-only syncs of `model` into an engine with this layout and groups.

    `groups` lists the checkpoint names the engine loads into one fused parameter; every
    layout name must be in exactly one group. Raises TypeError for a non-LoRA adapter and
    ValueError when the engine's model is not the trainer's base model, or when a tied
    embedding engine cannot represent the adapter (a trained lm_head apart from the
    embedding, or LoRA on the tied weight).
    """
    adapter_name, _ = active_lora(model)
    served = _served_params(model, adapter_name, layout)
    merges = _merge_sources(model, adapter_name, served)
    entries = {
        ckpt: merges.get(ckpt, Entry(ckpt, Source.PARAM, param, param))
        for ckpt, param in served.items()
    }
    changed = set(merges) | {
        ckpt for ckpt, param in served.items() if "modules_to_save" in param.split(".")
    }
    full: list[Entry] = []
    changed_entries: list[Entry] = []
    for group in groups:  # group order keeps each fused parameter's tensors together
        members = [entries[ckpt] for ckpt in group]
        full.extend(members)
        if changed.intersection(group):
            changed_entries.extend(members)
    return SyncPlan(adapter_name, tuple(full), tuple(changed_entries))
