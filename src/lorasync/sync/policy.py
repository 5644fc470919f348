"""The trainer's policy: a base model with a PEFT LoRA adapter, loaded, checked or made up.

Loading follows PEFT's own folder convention: an adapter saved under the name `default` sits
directly in its folder; one saved under another name sits in a subfolder of that name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, PeftType, get_peft_model
from transformers import AutoModelForCausalLM

from lorasync.served_model import DTYPES
from lorasync.sync.naming import check_adapter_name

ADAPTER_CONFIG = "adapter_config.json"
# The rank up to which an engine serves adapters by default (vLLM's `max_lora_rank`).
MAX_LORA_RANK = 16


def lora_targets(targets: Sequence[str]) -> str | list[str]:
    """PEFT's `target_modules` for a list of names: ["all-linear"] is PEFT's string form."""
    return targets[0] if list(targets) == ["all-linear"] else list(targets)


def adapter_rank(config: LoraConfig) -> int:
    """The largest rank of an adapter (its `r`, or a larger one from `rank_pattern`)."""
    return max([config.r, *(config.rank_pattern or {}).values()])


def active_lora(model: PeftModel) -> tuple[str, LoraConfig]:
    """The active adapter's name and config; raise TypeError unless it is a LoRA adapter."""
    name = model.active_adapter
    config = model.peft_config[name]
    if config.peft_type != PeftType.LORA:
        raise TypeError(
            f"lorasync syncs LoRA adapters only, but the active adapter {name!r} is of type "
            f"{config.peft_type.value}: train with peft.LoraConfig"
        )
    return name, config


def find_adapter(adapter_dir: str | Path) -> tuple[Path, str]:
    """The folder holding adapter_config.json and the adapter's name, per PEFT's layout."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter folder {str(root)!r} does not exist")
    if (root / ADAPTER_CONFIG).is_file():
        return root, "default"
    named = sorted(p for p in root.iterdir() if (p / ADAPTER_CONFIG).is_file())
    if len(named) != 1:
        found = ", ".join(p.name for p in named) or "none"
        raise FileNotFoundError(
            f"no {ADAPTER_CONFIG} in {str(root)!r}, and it must otherwise hold exactly one "
            f"named adapter subfolder (found: {found}); pass the folder PEFT's "
            "save_pretrained wrote"
        )
    return named[0], named[0].name


def load_policy(base_dir: str | Path, adapter_dir: str | Path, dtype: str = "float32") -> PeftModel:
    """Load the base model and attach the saved LoRA adapter, trainable and active.

    Raises FileNotFoundError for missing files, TypeError for a non-LoRA adapter and
    ValueError for an adapter made for another base model.
    """
    if not (Path(base_dir) / "config.json").is_file():
        raise FileNotFoundError(f"base model folder {str(base_dir)!r} has no config.json")
    folder, name = find_adapter(adapter_dir)
    peft_config = PeftConfig.from_pretrained(folder)
    if peft_config.peft_type != PeftType.LORA:
        raise TypeError(
            f"adapter in {str(folder)!r} is of type {peft_config.peft_type.value}; "
            "lorasync syncs LoRA adapters only (peft.LoraConfig)"
        )
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype])
    try:
        model = PeftModel.from_pretrained(base, folder, adapter_name=name, is_trainable=True)
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise ValueError(
            f"adapter {str(folder)!r} does not fit base model {str(base_dir)!r} "
            f"(shape mismatch: {str(err).splitlines()[1].strip()}); pass the base model "
            "the adapter was trained on"
        ) from err
    return model


@dataclass
class AdapterSpec:
    """A random LoRA adapter to make: which modules, what rank, under which name."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    rank: int = 8
    alpha: float | None = None
    modules_to_save: list[str] = field(default_factory=list)
    adapter_name: str = "default"
    seed: int = 0
    init_std: float = 0.05

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"AdapterSpec.rank must be >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("AdapterSpec.targets is empty: name modules or use 'all-linear'")
        check_adapter_name(self.adapter_name, "AdapterSpec.adapter_name")

    def lora_config(self, tied_embeddings: bool) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else 2 * self.rank,
            target_modules=lora_targets(self.targets),
            modules_to_save=list(self.modules_to_save) or None,
            # With tied embeddings, keep lm_head and embed_tokens one tensor, as vLLM does.
            ensure_weight_tying=tied_embeddings and bool(self.modules_to_save),
            task_type="CAUSAL_LM",
        )


def randomize_trainable(model: torch.nn.Module, seed: int, std: float) -> None:
    """Add seeded Gaussian noise to every trainable tensor of the model, in place.

    PEFT initialises lora_B to zero (a no-op adapter); a sync test needs one that changes
    the outputs, so all trainable tensors (LoRA factors, saved modules, token rows, DoRA
    magnitudes) are perturbed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_((torch.randn(param.shape, generator=gen) * std).to(param.dtype))


def attach_random_adapter(base: torch.nn.Module, spec: AdapterSpec) -> PeftModel:
    """Wrap `base` with a LoRA adapter whose trainable tensors are random, not zero."""
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    model = get_peft_model(base, spec.lora_config(tied), adapter_name=spec.adapter_name)
    randomize_trainable(model, spec.seed, spec.init_std)
    return model


def make_random_adapter(base_dir: str | Path, out_dir: str | Path, spec: AdapterSpec) -> Path:
    """Make a random adapter for the base model in `base_dir` and save it in PEFT format."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = attach_random_adapter(base, spec)
    model.save_pretrained(out_dir)
    return Path(out_dir)
