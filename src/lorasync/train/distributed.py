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
- the sync: gathered under FSDP2, sent by rank 0 alone into shared servers (`rank_sync.py`);
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
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    # async: the health check of a stale batch is a forward pass on some ranks only, which
    # FSDP2 cannot run (its gathers are collectives). Into shared servers rank 0's sync lands
    # while the other ranks generate, so only the servers can say which version sampled each
    # token (in_flight: keep); a rank's own lock keeps out only its own syncs
    rollout = config.rollout
    if rollout.mode == "async" and config.parallel.mode != "ddp":
        raise ConfigError(
            f"rollout.mode = 'async' on {d.world} ranks runs with parallel.mode=ddp so far, got "
            f"{config.parallel.mode!r}; set parallel.mode=ddp, or rollout.mode=sync"
        )
    if rollout.mode == "async" and config.engine.kind == "server" and rollout.in_flight != "keep":
        raise ConfigError(
            f"rollout.in_flight = {rollout.in_flight!r}: async on {d.world} ranks against shared "
            "servers needs each token's version from the servers; set rollout.in_flight=keep"
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
        "wait_seconds", "sync_seconds", "sync_gathered_mb", "logprob_diff_quantile",
        "weight_check_mismatches", "weight_check_max_abs_diff", "weight_check_unread")
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
