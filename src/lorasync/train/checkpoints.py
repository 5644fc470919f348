"""Checkpoints of a run: `<out>/checkpoints/step-NNNNNN/`.

Each holds the adapter in PEFT format (`adapter/`: loads with `PeftModel.from_pretrained` and
into vLLM with `--lora-modules`), the optimizer and scheduler state and the random number
generators' states (`trainer.pt`), and the step with the run's config (`trainer_state.json`).
Resuming from one continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

CHECKPOINTS = "checkpoints"


def save(out: Path, step: int, model: PeftModel, optimizer, scheduler, config: dict) -> Path:
    """Write the checkpoint of `step` under `out` and return its folder."""
    path = out / CHECKPOINTS / f"step-{step:06d}"
    model.save_pretrained(path / "adapter")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        },
        path / "trainer.pt",
    )
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
    return path


def latest(out: Path) -> Path | None:
    """The newest checkpoint folder under `out`, or None."""
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def load(path: Path, model: PeftModel, optimizer, scheduler) -> int:
    """Restore a checkpoint into the live objects and the RNGs; return its step."""
    state = json.loads((path / "trainer_state.json").read_text())
    set_peft_model_state_dict(model, load_file(path / "adapter" / "adapter_model.safetensors"))
    saved = torch.load(path / "trainer.pt", weights_only=False)  # python's RNG state is a tuple
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    return state["step"]
