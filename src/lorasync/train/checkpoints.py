"""Checkpoints of a run: `<out>/checkpoints/step-NNNNNN/`.

Each holds the adapter in PEFT format (`adapter/`: loads with `PeftModel.from_pretrained` and
into vLLM with `--lora-modules`), the optimizer and scheduler state and the random number
generators' states (`trainer.pt`), and the step with the run's config (`trainer_state.json`).
Resuming from one continues exactly as the uninterrupted run would have. A data-parallel run's
checkpoint is written once, by rank 0, whole (gathered from the shards under FSDP2), with every
rank's random number generators; it resumes on any number of ranks, in either parallel mode
(exactly on as many ranks as wrote it; see `load`).

Nothing is lost to a crash, a kill or a full disk mid-save: a checkpoint is written whole into
`step-NNNNNN.tmp/`, every file and the folder fsynced, the completion marker (`COMPLETE`) last,
then renamed into place in one `os.replace`. `latest` takes only complete checkpoints and names
the torn ones it skipped; a failed save leaves the previous checkpoints as they were. Loading
unpickles no code (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from lorasync.train.distributed import Dist, clean_name, failures
from lorasync.train.rank_sync import gathered

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # the marker a checkpoint folder gets last, once every file is on disk


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
    """Write the checkpoint of `step` under `out` (once: rank 0), atomically, and return its
    folder; `state` is `gather_state`'s. A checkpoint of this step already there is replaced
    only once the new one is whole."""
    path = folder(out, step)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a save that died before its rename
    try:
        _write(tmp, step, model, scheduler, config, state)
    except OSError as err:  # a full disk, a quota: what was there stays whole
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(
            f"could not save the checkpoint of step {step} to {path}: {err}. The earlier "
            f"checkpoints are intact (the latest: {latest(out)}); free space and run again with "
            "--resume"
        ) from err
    if path.exists():  # the final save of a step saved already: swap, never a moment without one
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync(path.parent)
    return path


def _write(tmp: Path, step: int, model: PeftModel, scheduler, config: dict, state: dict) -> None:
    """Every file of a checkpoint into `tmp`, the marker last, all on disk when it returns."""
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "adapter", **({} if state["adapter"] is None else {"state_dict": state["adapter"]}))
    torch.save(
        {
            "optimizer": state["optimizer"],
            "scheduler": scheduler.state_dict(),
            "rng": state["rng"][0],
            "rng_ranks": state["rng"],  # one per rank
        },
        tmp / "trainer.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
    (tmp / COMPLETE).write_text(f"{step}\n")
    _fsync_tree(tmp)


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(root)


def folder(out: Path, step: int) -> Path:
    """The checkpoint folder of `step` under `out`."""
    return out / CHECKPOINTS / f"step-{step:06d}"


def complete(path: Path) -> bool:
    """Whether a checkpoint folder is whole: its marker, or (written before markers) its last
    file, `trainer_state.json`, beside the others."""
    if (path / COMPLETE).is_file():
        return True
    files = ("trainer_state.json", "trainer.pt", "adapter/adapter_model.safetensors")
    return all((path / f).is_file() for f in files) and not path.name.endswith(".tmp")


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint folder under `out`, or None; the torn ones skipped are
    named on stderr. A `.old` folder counts where a crash came between the two renames of a
    swap (`save`), leaving it the only copy of its step."""
    found = sorted(
        p for p in (out / CHECKPOINTS).glob("step-*")
        if not p.name.endswith(".tmp") and not (p.name.endswith(".old") and p.with_suffix("").exists())
    )
    for path in reversed(found):
        if complete(path):
            return path
        print(f"lorasync: skipping the torn checkpoint {path} (a save that did not finish)", file=sys.stderr)
    return None


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
    saved = torch.load(path / "trainer.pt", weights_only=True)  # tensors and plain data only
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
