"""Checkpoints of a run: `<out>/checkpoints/step-NNNNNN/`.

Each holds the adapter in PEFT format (`adapter/`: loads with `PeftModel.from_pretrained` and
into vLLM with `--lora-modules`), the optimizer and scheduler state and the random number
generators' states (`trainer.pt`), and the step with the run's config (`trainer_state.json`).
Resuming from one continues exactly as the uninterrupted run would have. A data-parallel run's
checkpoint is written once, by rank 0, whole (gathered from the shards under FSDP2), with every
rank's random number generators; it resumes on the same number of ranks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from lorasync.train.distributed import Dist, clean_name, failures, gathered

CHECKPOINTS = "checkpoints"


def gather_state(model: PeftModel, optimizer, d: Dist) -> dict:
    """What a checkpoint holds of the live objects, gathered on every rank together (call it
    on all of them): the trainable parameters whole (FSDP2 shards them: saving rank 0's view
    would keep its shards only, accelerate #4206), the optimizer state whole, and each rank's
    random number generators."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if not d.active:
        return {"adapter": None, "optimizer": optimizer.state_dict(), "rng": [rng]}
    ranks = [None] * d.world
    with failures(d, "gathering the checkpoint"):
        torch.distributed.all_gather_object(ranks, rng)
        with gathered(model, d):
            adapter = {clean_name(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if d.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            opt = get_optimizer_state_dict(model, optimizer, options=options)
        else:
            opt = optimizer.state_dict()  # the same on every rank
    return {"adapter": adapter, "optimizer": opt, "rng": ranks, "mode": d.mode}


def save(out: Path, step: int, model: PeftModel, scheduler, config: dict, state: dict) -> Path:
    """Write the checkpoint of `step` under `out` (once: rank 0) and return its folder;
    `state` is `gather_state`'s."""
    path = folder(out, step)
    model.save_pretrained(path / "adapter", **({} if state["adapter"] is None else {"state_dict": state["adapter"]}))
    torch.save(
        {
            "optimizer": state["optimizer"],
            "scheduler": scheduler.state_dict(),
            "rng": state["rng"][0],
            "rng_ranks": state["rng"],  # one per rank; a resumed run needs as many
            "mode": state.get("mode"),  # parallel.mode; None: one process
        },
        path / "trainer.pt",
    )
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
    return path


def folder(out: Path, step: int) -> Path:
    """The checkpoint folder of `step` under `out`."""
    return out / CHECKPOINTS / f"step-{step:06d}"


def latest(out: Path) -> Path | None:
    """The newest checkpoint folder under `out`, or None."""
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def load(path: Path, model: PeftModel, optimizer, scheduler, d: Dist | None = None) -> int:
    """Restore a checkpoint into the live objects and the RNGs (this rank's); return its step.
    A data-parallel checkpoint resumes on as many ranks as wrote it."""
    d = d or Dist()
    state = json.loads((path / "trainer_state.json").read_text())
    saved = torch.load(path / "trainer.pt", weights_only=False)  # python's RNG state is a tuple
    ranks = saved.get("rng_ranks", [saved["rng"]])
    if len(ranks) != d.world:
        raise ValueError(
            f"{path} was written by {len(ranks)} rank(s); this run has {d.world}: resume with "
            f"--nproc {len(ranks)}, or start a new output_dir"
        )
    if d.active and saved.get("mode") != d.mode:  # the optimizer states are keyed differently
        raise ValueError(
            f"{path} was written with parallel.mode={saved.get('mode')}; this run has "
            f"parallel.mode={d.mode}: resume with the same mode, or start a new output_dir"
        )
    adapter = load_file(path / "adapter" / "adapter_model.safetensors")
    if d.active and d.mode == "fsdp2":
        _load_sharded(model, optimizer, adapter, saved["optimizer"], d)
    else:
        set_peft_model_state_dict(model, adapter)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(ranks[d.rank]["torch"])
    random.setstate(ranks[d.rank]["python"])
    return state["step"]


def _load_sharded(model: PeftModel, optimizer, adapter: dict, optim_state: dict, d: Dist) -> None:
    """FSDP2: every rank copies its shards of the whole saved adapter and optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import distribute_tensor

    name = model.active_adapter
    with torch.no_grad(), failures(d, "loading the checkpoint"):
        for key, param in model.named_parameters():
            if param.requires_grad:  # PEFT saves without the adapter's name
                full = adapter[clean_name(key).replace(f".{name}.", ".")].to(param.dtype)
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements))
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
