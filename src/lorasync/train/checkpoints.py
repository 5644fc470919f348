"""Checkpoints of a run: `<out>/checkpoints/step-NNNNNN/`.

Each holds the adapter in PEFT format (`adapter/`: loads with `PeftModel.from_pretrained` and
into vLLM with `--lora-modules`), the optimizer and scheduler state and the random number
generators' states (`trainer.pt`), and the step with the run's config (`trainer_state.json`).
Resuming from one continues exactly as the uninterrupted run would have. A data-parallel run's
checkpoint is written once, by rank 0, whole (gathered from the shards under FSDP2), with every
rank's random number generators; it resumes on any number of ranks, in either parallel mode
(exactly on as many ranks as wrote it; see `load`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from lorasync.train.distributed import Dist, clean_name, failures
from lorasync.train.rank_sync import gathered

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
    return {"adapter": adapter, "optimizer": opt, "rng": ranks}


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
            "rng_ranks": state["rng"],  # one per rank
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

    On any number of ranks and in any `parallel.mode`, whatever wrote it: the adapter and the
    optimizer state are saved whole, and each rank takes its part. On as many ranks as wrote
    it, each takes back its own RNG states and the run continues exactly as it would have;
    on another number, rank r takes those of rank r mod M (a warning says so: each rank's
    generations are seeded by the step, the rank and the number of ranks, so they differ
    from what the first run would have sampled, while the adapter, the optimizer, the
    schedule and the global batch of prompts continue exactly)."""
    d = d or Dist()
    state = json.loads((path / "trainer_state.json").read_text())
    saved = torch.load(path / "trainer.pt", weights_only=False)  # python's RNG state is a tuple
    ranks = saved.get("rng_ranks", [saved["rng"]])
    if len(ranks) != d.world and d.main:
        print(
            f"lorasync: resuming a checkpoint of {len(ranks)} rank(s) on {d.world}: the adapter, "
            "optimizer, schedule and prompts continue exactly; the generations differ from the "
            "first run's (sampling is seeded per rank)", file=sys.stderr,
        )
    adapter = load_file(path / "adapter" / "adapter_model.safetensors")
    if d.active and d.mode == "fsdp2":
        _load_sharded(model, optimizer, adapter, keyed(saved["optimizer"], model), d)
    else:
        set_peft_model_state_dict(model, adapter)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(ranks[d.rank % len(ranks)]["torch"])
    random.setstate(ranks[d.rank % len(ranks)]["python"])
    return state["step"]


def keyed(optim_state: dict, model: PeftModel) -> dict:
    """An optimizer state dict keyed by parameter name, as FSDP2's full state dict is
    (`torch.distributed.checkpoint.state_dict`), from one keyed by index (`Optimizer.state_dict`:
    one process or DDP wrote it). The trainer's optimizer holds the trainable parameters in
    `named_parameters` order, which maps one to the other. Hand-written: torch's loader under
    FSDP2 takes names only. (The other way needs nothing: `Optimizer.load_state_dict` matches
    parameters by their position in the groups, whatever they are keyed by.)"""
    groups = optim_state["param_groups"]
    if all(isinstance(p, str) for g in groups for p in g["params"]):
        return optim_state
    names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
    if sum(len(g["params"]) for g in groups) != len(names):
        raise ValueError(
            f"the checkpoint's optimizer state holds {sum(len(g['params']) for g in groups)} "
            f"parameters, this model trains {len(names)}: resume with the run's own lora "
            "settings, or start a new output_dir"
        )
    return {
        "state": {names[k]: v for k, v in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in groups],
    }


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
