"""Plan what a sync sends: which trainer tensor goes to which checkpoint name in the engine.

The plan is computed once per (trainer model, engine) pair and checked against the engine's
checkpoint layout before anything is merged or sent, so a mismatched engine fails fast with
nothing changed on either side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from peft import PeftModel

from lorasync.adapters import active_lora
from lorasync.naming import served_name

Layout = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class SyncPlan:
    """Pairs of (trainer parameter name, checkpoint name), in send order."""

    adapter_name: str
    entries: tuple[tuple[str, str], ...]

    @property
    def checkpoint_names(self) -> list[str]:
        return [ckpt for _, ckpt in self.entries]


def _ties_output_embedding(model: PeftModel) -> bool:
    """Whether the trainer's lm_head weight is its (active) input embedding weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def plan_full_sync(model: PeftModel, layout: Layout) -> SyncPlan:
    """Plan a sync of every served tensor, checked name by name and shape by shape.

    Raises TypeError for a non-LoRA adapter and ValueError when the engine's model is not
    the trainer's base model, or when a tied-embedding engine cannot represent the adapter.
    """
    adapter_name, _ = active_lora(model)
    entries: list[tuple[str, str]] = []
    unknown: list[str] = []
    mismatched: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        ckpt = served_name(name, adapter_name)
        if ckpt is None:
            continue
        if ckpt not in layout:
            unknown.append(ckpt)
        elif tuple(param.shape) != layout[ckpt]:
            mismatched.append(f"{ckpt}: trainer {tuple(param.shape)}, engine {layout[ckpt]}")
        else:
            entries.append((name, ckpt))
    if unknown == ["lm_head.weight"] and "lm_head.weight" not in layout:
        # The engine's checkpoint ties lm_head to embed_tokens; that is right only if the
        # trainer's lm_head is its trained input embedding too.
        if not _ties_output_embedding(model):
            raise ValueError(
                "the engine's model ties lm_head to embed_tokens, but the trainer's lm_head "
                "is a separate tensor (modules_to_save on a tied embedding without weight "
                "tying); vLLM cannot serve that policy. Fix: LoraConfig(ensure_weight_tying="
                "True) or a base model with tie_word_embeddings=False"
            )
        unknown = []
    missing = sorted(set(layout) - {ckpt for _, ckpt in entries} - set(unknown))
    if unknown or mismatched or missing:
        problems = []
        for label, items in (
            ("names unknown to the engine", unknown),
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
    return SyncPlan(adapter_name=adapter_name, entries=tuple(entries))
