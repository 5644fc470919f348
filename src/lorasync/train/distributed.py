"""Data-parallel training: everything the trainer does differently on N ranks, in one place.

`torchrun --nproc-per-node N -m lorasync train ...` (or `lorasync train --nproc N ...`, which
runs torchrun for you) starts N ranks; each calls `init`, which joins the process group torchrun
describes in the environment (gloo on CPU, NCCL on CUDA). With one process nothing here does
anything: `Dist()` is rank 0 of 1 and every function below is the identity.

What changes on N ranks (docs/distributed.md):
- the data: each rank takes its share of every step's prompts, whole prompts so that no GRPO
  group is split (`shard`); the global batch, and what a resumed run draws, stay the same;
- the gradient: `wrap` puts the policy under DDP (gradients all-reduced) or FSDP2
  (`fully_shard`: parameters sharded, gradients reduce-scattered). Both average over ranks;
  the trainer turns that average into the token mean over the global batch (`total`);
- the sync: under FSDP2 the parameters a sync reads are gathered with `full_tensor()` on all
  ranks together: the trainable ones before anyone sends (`gathered`: a factor or adapter
  sync), or, for a merged sync, tensor by tensor as the engine takes them, every rank running
  the same stream (`Gathering`); a rank interleaving its gathers with rank 0's send is the
  hang of TRL #7103. Into shared servers only rank 0 sends, and no rank goes on before it is
  done (a barrier on the version, `sync_policy`);
- the metrics: reduced over ranks (`reduce_metrics`): rewards over the global batch, the
  worst logprob difference of any rank.

A rank that dies or hangs makes every collective of the others fail within
`parallel.timeout_seconds` (gloo's own timeout), raised as `RankFailure`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorasync.sync.base import Strategy
from lorasync.sync.weight_sync import WeightSync
from lorasync.train.config import ConfigError, ParallelConfig, TrainConfig

# Prefixes that wrappers put into parameter names: DDP's `module.`, FSDP1's and activation
# checkpointing's wrapper modules (TRL #7131). The sync and the checkpoints must see the
# PEFT model's own names.
_WRAPPER_PREFIXES = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


# gloo's and NCCL's errors from inside DDP's or FSDP2's hooks are plain RuntimeErrors naming
# their source ("third_party/gloo/.../pair.cc: Connection reset by peer"); other errors (a
# server's timeout, say) are not another rank's failure
_COMM_ERROR = re.compile(r"gloo|nccl", re.I)


class RankFailure(RuntimeError):
    """Another rank died or hung: a collective failed or timed out."""


@dataclass
class Dist:
    """This process's place in the run: rank `rank` of `world`, training by `mode`."""

    rank: int = 0
    world: int = 1
    mode: str = "ddp"
    timeout: float = 600.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes (`module.`, `_fsdp_wrapped_module.`, ...)."""
    return _WRAPPER_PREFIXES.sub(r"\1", name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model a wrapper holds (DDP's `.module`); FSDP2 wraps nothing, so it is the model."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local world size) as torchrun sets them; (0, 1, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def init(parallel: ParallelConfig) -> Dist:
    """Join the process group torchrun describes (once per process; later calls return the
    same), and give each rank its share of the CPU threads. One process: `Dist()`."""
    rank, world, local_world = world_from_env()
    if world == 1:
        return Dist(mode=parallel.mode, timeout=parallel.timeout_seconds)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=parallel.timeout_seconds),
        )
        # N ranks on one machine share its cores; torch's default (all of them per rank)
        # oversubscribes and runs slower than one rank
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    elif dist.get_world_size() != world:
        raise RuntimeError(
            f"torchrun started {world} ranks, but this process's default process group has "
            f"{dist.get_world_size()}: something else created it first (a colocated vLLM engine "
            "does, when built before the trainer). Call lorasync.train.distributed.init("
            "config.parallel) before building the engine, as `lorasync train` does"
        )
    return Dist(dist.get_rank(), dist.get_world_size(), parallel.mode, parallel.timeout_seconds)


def check(config: TrainConfig, d: Dist) -> None:
    """ConfigError for settings that cannot run on `d.world` ranks (known only at start)."""
    if not d.active:
        return
    per = config.rollout.prompts_per_step
    if per % d.world:
        raise ConfigError(
            f"rollout.prompts_per_step = {per}: must be a multiple of the {d.world} ranks "
            f"(each rank trains on whole prompt groups); use {per - per % d.world or d.world}"
        )
    if config.rollout.mode != "sync":
        raise ConfigError(
            f"rollout.mode = {config.rollout.mode!r}: on {d.world} ranks only sync mode runs "
            "so far; set rollout.mode=sync"
        )
    local = per // d.world * config.rollout.num_generations
    if local % config.optim.grad_accum:
        raise ConfigError(
            f"optim.grad_accum = {config.optim.grad_accum}: must divide each rank's "
            f"{local} completions (prompts_per_step / ranks * num_generations)"
        )


def close(d: Dist) -> None:
    """Leave the process group (the engine may have torn it down already)."""
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def failures(d: Dist, what: str) -> Iterator[None]:
    """Collectives inside fail as `RankFailure`, which says what was going on and what to do."""
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as err:
        if not d.active or not (isinstance(err, dist.DistError) or _COMM_ERROR.search(str(err))):
            raise
        raise RankFailure(
            f"rank {d.rank} of {d.world}: {what} failed: another rank died or did not answer "
            f"within parallel.timeout_seconds = {d.timeout:g} (see the other ranks' output for "
            f"the first error): {err}"
        ) from err


# --- data ---------------------------------------------------------------------------------------


def shard(rows: list, d: Dist) -> list:
    """This rank's share of a step's prompts: a contiguous block of whole prompts."""
    per = len(rows) // d.world
    return rows[d.rank * per : (d.rank + 1) * per]


# --- the gradient --------------------------------------------------------------------------------


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The module the training forward passes go through. DDP: a wrapper whose backward
    all-reduces the gradients (the model itself is what `unwrap` gives back). FSDP2:
    `fully_shard` on each transformer block, then on the whole PEFT model, in place; the
    parameters become DTensors sharded over the ranks, and the model is its own module."""
    if not d.active:
        return model
    if d.mode == "ddp":
        device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # DDP starts every rank from rank 0's parameters; fully_shard keeps each rank's own shard
    # of its own values, so a LoRA initialisation drawn from differing RNGs would mix. The
    # frozen base comes from one checkpoint; the trainable tensors go from rank 0.
    with failures(d, "broadcasting rank 0's initial adapter"), torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (d.world,))
    for module in model.modules():  # one unit per decoder block: gathered one at a time
        if type(module).__name__.endswith("DecoderLayer") or type(module).__name__ == "GPT2Block":
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def total(value: float, d: Dist) -> float:
    """The sum of `value` over all ranks."""
    if not d.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    with failures(d, "summing over ranks"):
        dist.all_reduce(t)
    return float(t)


# --- the sync ------------------------------------------------------------------------------------

# the strategies that merge on the trainer: under FSDP2 they read the frozen base weights too,
# gathered one tensor at a time as the engine takes them (`Gathering`)
MERGED = (Strategy.STREAMING, Strategy.MERGE_UNMERGE)


@contextlib.contextmanager
def gathered(model: torch.nn.Module, d: Dist, tally: Gathering | None = None) -> Iterator[None]:
    """Under FSDP2: inside, the model's trainable parameters (LoRA factors, `modules_to_save`)
    are whole tensors, gathered by `full_tensor()` on every rank, all before the block runs
    (so rank 0's send never interleaves with another rank's gather: TRL #7103). What a factor
    or adapter sync or a checkpoint reads; the frozen base stays sharded. `tally` counts their
    bytes as held for the block. Outside FSDP2, nothing to do."""
    if not (d.active and d.mode == "fsdp2"):
        yield
        return
    from torch.distributed.tensor import DTensor

    swapped, whole = [], {}
    with failures(d, "gathering the sharded parameters"):
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and param.requires_grad:
                    # hand-written: FSDP2's own unshard() gathers whole units, base included.
                    # A tied parameter is gathered once, and stays tied.
                    if id(param) not in whole:
                        whole[id(param)] = torch.nn.Parameter(param.full_tensor(), requires_grad=True)
                    module._parameters[name] = whole[id(param)]
                    swapped.append((module, name, param))
    size = sum(t.numel() * t.element_size() for t in whole.values())
    if tally is not None:
        tally.held(size)
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        if tally is not None:
            tally.freed(size)


class Gathering:
    """The engine a sync sends to under FSDP2. Each tensor the engine takes (or each part of a
    lazy `MergedWeight`: base weight and factors) is gathered with `full_tensor()` as the
    engine asks for it, so a rank holds the whole of one tensor at a time, never the whole
    model: the merged strategies' base weights, merged (`merge-unmerge`: PEFT's merge, on the
    shards) or not. Every rank runs the same sync, so the gathers run in the same order on
    all; on ranks that do not send (`sends=False`: ranks > 0 into shared servers) the gathered
    tensors are dropped. `peak_bytes`: the most bytes of gathered tensors alive at once since
    `gathering_metrics` last read it. The rest is the engine's."""

    def __init__(self, engine, d: Dist, sends: bool = True) -> None:
        self.engine, self.d, self.sends = engine, d, sends
        self.live = self.peak_bytes = 0

    def __getattr__(self, name: str):  # only what this class lacks; never `engine` (a copy)
        if name == "engine" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.engine, name)

    def load_weights(self, weights) -> int:
        with failures(self.d, "gathering a tensor for the sync"):
            stream = weights.map(self._whole)  # a WeightStream: a server's manifest reads its names
            if self.sends:
                return self.engine.load_weights(stream)
            for _ in stream:
                pass
            return self.engine.weight_version

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        from lorasync.sync.merged_weight import MergedWeight

        if isinstance(tensor, MergedWeight):
            w, left, right = (self._whole(t) for t in (tensor.weight, tensor.left, tensor.right))
            return MergedWeight(w, left, right, tensor.scale, tensor.kernel)
        if not isinstance(tensor, DTensor):
            return tensor
        whole = tensor.full_tensor()
        self.held(size := whole.numel() * whole.element_size())
        weakref.finalize(whole, self.freed, size)  # when the engine is done with it
        return whole

    def held(self, size: int) -> None:
        self.live += size
        self.peak_bytes = max(self.peak_bytes, self.live)

    def freed(self, size: int) -> None:
        self.live -= size


def sync_target(engine, d: Dist, shared: bool):
    """What `WeightSync` sends to: the engine, or under FSDP2 the engine behind `Gathering`
    (which sends from rank 0 alone into shared servers)."""
    if d.active and d.mode == "fsdp2":
        return Gathering(engine, d, sends=d.main or not shared)
    return engine


def sync_policy(sync: WeightSync, d: Dist, shared: bool):
    """One sync of the policy on every rank: returns the `SyncReport` (rank 0's when shared).

    Colocated (`shared=False`), each rank syncs its own engine: the policy is the same on all
    ranks after the gradient all-reduce. Into shared servers rank 0 sends; the others wait at
    a barrier and receive its report, so no rank generates before the new version is served.
    Under FSDP2 a factor or adapter sync (or `auto`'s choice) reads the trainable parameters,
    gathered first (`gathered`); a merged sync runs on every rank, its engine behind
    `Gathering` (`sync_target`), each base weight gathered as it is sent."""
    merged = sync.strategy in MERGED
    runs = d.main or not shared or (merged and d.mode == "fsdp2")
    tally = sync.engine if isinstance(sync.engine, Gathering) else None
    with contextlib.nullcontext() if merged else gathered(sync.model, d, tally):
        report = sync() if runs else None
    return broadcast_object(report, d, "waiting for rank 0's sync into the servers") if shared else report


def gathering_metrics(target) -> dict:
    """`sync_gathered_mb`: the most megabytes of gathered (whole) tensors this rank held at
    once in the syncs since the last call, under FSDP2 (`Gathering`); nothing otherwise."""
    if not isinstance(target, Gathering):
        return {}
    peak, target.peak_bytes = target.peak_bytes, target.live
    return {"sync_gathered_mb": peak / 2**20}


def broadcast_object(value, d: Dist, what: str = "receiving from rank 0"):
    """Rank 0's `value` on every rank (`what`: what a failure says was going on)."""
    if not d.active:
        return value
    box = [value]
    with failures(d, what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist, what: str) -> None:
    if d.active:
        with failures(d, what):
            dist.barrier()


# --- metrics -------------------------------------------------------------------------------------

_MAX = ("logprob_diff_max", "is_weight_max", "staleness_max", "step_seconds", "generation_seconds",
        "wait_seconds", "sync_seconds", "sync_gathered_mb")
_MIN = ("is_weight_min",)
_SUM = ("completion_tokens", "tokens_per_second")


def reduce_metrics(metrics: dict, rewards: torch.Tensor, d: Dist) -> dict:
    """One step's metrics over all ranks: reward mean and std over the global batch; maxima,
    minima, sums and means of the others as their names say; the policy versions of all
    ranks' batches; the rest rank 0's."""
    if not d.active:
        return metrics
    numbers = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    with failures(d, "reducing the step's metrics"):
        everything = [torch.zeros_like(rewards) for _ in range(d.world)]
        dist.all_gather(everything, rewards.contiguous())
        out = dict(metrics)
        for op, keys in ((dist.ReduceOp.MAX, _MAX), (dist.ReduceOp.MIN, _MIN), (dist.ReduceOp.SUM, _SUM)):
            chosen = [k for k in numbers if k in keys]
            t = torch.tensor([float(metrics[k]) for k in chosen], dtype=torch.float64)
            dist.all_reduce(t, op=op)
            out |= dict(zip(chosen, t.tolist()))
        mean = [k for k in numbers if k not in _MAX + _MIN + _SUM and k != "step"]
        t = torch.tensor([float(metrics[k]) for k in mean], dtype=torch.float64)
        dist.all_reduce(t)
        out |= {k: v / d.world for k, v in zip(mean, t.tolist())}
        if "policy_versions" in metrics:  # the versions any rank's batch was sampled under
            versions = [None] * d.world
            dist.all_gather_object(versions, metrics["policy_versions"])
            out["policy_versions"] = sorted(set().union(*versions))
    for k in numbers:  # whole numbers stay whole
        if isinstance(metrics[k], int):
            out[k] = int(round(out[k]))
    all_rewards = torch.cat(everything)
    out["reward_mean"] = all_rewards.mean().item()
    out["reward_std"] = all_rewards.std().item()
    return out
