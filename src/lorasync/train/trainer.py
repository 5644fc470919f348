"""The GRPO trainer: a PEFT LoRA policy, a generator engine, and a verified sync after every step.

One step: draw prompts; sample `num_generations` completions per prompt from the engine; score
them with the reward functions; compute group-relative advantages (rollout.py); then
`num_iterations` (GRPO's μ) optimizer steps over that batch, each the clipped,
importance-corrected policy-gradient loss (grpo.py) over `grad_accum` micro-batches, the ratio
taken against the logprobs of the policy that generated the batch; then one sync of the new
adapter into the engine. Every step also measures how far the engine's sampling logprobs are
from the trainer's on the same tokens: the live health check of the sync.

The trainer talks to the engine through one object, `generation.Generation` (batches and
syncs); it knows nothing of vLLM, and works the same with a colocated engine or running
servers. On N ranks (torchrun) it trains data-parallel; what differs is in `distributed.py`.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from lorasync.served_model import DTYPES, dtype_name
from lorasync.sync.base import Engine
from lorasync.sync.policy import lora_targets
from lorasync.sync.verify import default_tolerance
from lorasync.train import checkpoints, distributed
from lorasync.train.config import ConfigError, TrainConfig, config_to_dict
from lorasync.models.prompt import encode_prompt
from lorasync.train.data import batch_at, load_rows
from lorasync.train.grpo import LossParts, grpo_loss
from lorasync.train.generation import Generation
from lorasync.train.health import Floor, health_warning, weight_metrics
from lorasync.train.metrics import MetricsLog, plot_report
from lorasync.train.rewards import load_reward
from lorasync.train.producer import Producer, StaleBatch
from lorasync.train.profile import StepProfile
from lorasync.train.rollout import Generated, Rollout, check_room, completion_logprobs, score
from lorasync.train.snapshots import PolicySnapshots


class GRPOTrainer:
    """GRPO with a LoRA policy; `train()` runs `optim.steps` steps and writes the run folder."""

    def __init__(self, config: TrainConfig, engine: Engine) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        if engine.dtype != DTYPES[config.model.dtype]:
            raise ConfigError(
                f"model.dtype = {config.model.dtype!r}, but the engine serves "
                f"{dtype_name(engine.dtype)}: set model.dtype={dtype_name(engine.dtype)}, or "
                f"start the servers with --dtype {config.model.dtype}"
            )
        self.dist = distributed.init(config.parallel)  # one process: rank 0 of 1
        distributed.check(config, self.dist)
        torch.manual_seed(config.optim.seed)  # the same on every rank: the same initial adapter
        random.seed(config.optim.seed)
        self.rows = load_rows(config.data)
        self.rewards = [(spec, load_reward(spec.function)) for spec in config.rewards]
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.base)
        # the longest prompts (by characters) against the engine's room, before any work; every
        # step checks its own batch again (`rollout.check_room`)
        field = config.data.prompt_field
        longest = sorted(self.rows, key=lambda row: len(str(row[field])))[-64:]
        check_room(engine, config, [encode_prompt(self.tokenizer, row[field]) for row in longest])
        base = AutoModelForCausalLM.from_pretrained(config.model.base, dtype=DTYPES[config.model.dtype])
        lora = config.lora
        self.model: PeftModel = get_peft_model(
            base,
            LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                       target_modules=lora_targets(lora.targets)),
        )
        # what the training forward passes go through: the model, or DDP's wrapper of it; under
        # FSDP2 the model itself, its parameters sharded (so before the optimizer holds them)
        self.train_model = distributed.wrap(self.model, self.dist)
        optim = config.optim
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=optim.lr)
        # μ optimizer steps per generation batch: the schedule counts optimizer steps
        self.scheduler = get_scheduler(
            optim.schedule, self.optimizer, optim.warmup_steps, optim.steps * optim.num_iterations
        )
        rollout = config.rollout
        self.generation = Generation(engine, self.model, config, self.dist)
        self.tolerance = config.logprob_tolerance or default_tolerance(config.model.dtype)
        self.floor = Floor()  # what the logprob level is judged against (measured in train())
        self.step = 0
        # the policies a batch may still come from: the last max_staleness (0 in sync mode)
        self.snapshots = PolicySnapshots(self.model, rollout.max_staleness + 1 if rollout.mode == "async" else 0)
        self.profile = StepProfile(self.model)  # where each step's time goes (metrics.jsonl)

    def save_checkpoint(self) -> Path:
        """Adapter (PEFT format), optimizer, scheduler and RNG states, and the step; on N ranks
        the whole adapter, written once by rank 0, and every rank's RNG states."""
        state = checkpoints.gather_state(self.model, self.optimizer, self.dist)
        if self.dist.main:
            checkpoints.save(self.out, self.step, self.model, self.scheduler, config_to_dict(self.config), state)
        distributed.barrier(self.dist, "saving a checkpoint")
        return checkpoints.folder(self.out, self.step)

    def resume(self) -> Path | None:
        """Load the latest checkpoint in the output folder, if there is one."""
        path = checkpoints.latest(self.out)
        if path is not None:
            self.step = checkpoints.load(path, self.model, self.optimizer, self.scheduler, self.dist)
        return path

    # -- one step ----------------------------------------------------------------------------

    def _optimizer_step(self, batch: Rollout) -> tuple[list[LossParts], float]:
        """One optimizer step over the whole batch, in `grad_accum` micro-batches. A batch
        whose old logprobs are not known yet gets them from this, the first update's forward
        pass (the parameters change only after the last micro-batch). The gradient is that of
        the token mean over the global batch (all micro-batches of all ranks): each
        micro-batch's token sum is back-propagated, and the sum scaled once at the end."""
        cfg = self.config.optim
        pad = self.tokenizer.pad_token_id
        micro = len(batch.samples) // cfg.grad_accum
        scoring = batch.old_logprobs is None
        if scoring:
            batch.old_logprobs = torch.zeros_like(batch.engine_logprobs)
        parts, kept = [], 0
        for k in range(cfg.grad_accum):
            s = slice(k * micro, (k + 1) * micro)
            prompts, completions = batch.prompts[s], batch.completions[s]
            with self.profile.phase("forward"):
                logprobs, _ = completion_logprobs(self.train_model, prompts, completions, pad, cfg.shared_prefix)
                width = logprobs.shape[1]
                # the policy's own tokens (multi-turn: not the environment's, which are context)
                mask = batch.mask[s, :width]
                if scoring:
                    batch.old_logprobs[s, : logprobs.shape[1]] = logprobs.detach()
                ref = None
                if cfg.beta > 0:
                    with torch.no_grad(), self.model.disable_adapter():
                        ref, _ = completion_logprobs(self.model, prompts, completions, pad, cfg.shared_prefix)
                part = grpo_loss(
                    logprobs, batch.old_logprobs[s, :width], batch.engine_logprobs[s, :width],
                    batch.advantages[s], mask, cfg.clip_eps, cfg.is_cap, cfg.beta, ref, is_mask=cfg.is_mask,
                )
            # the loss is the micro-batch's token mean; times its tokens (those the loss
            # keeps: grpo_loss's `is_mask` leaves some out), the token sum
            with self.profile.phase("backward"):
                (part.loss * part.tokens).backward()
            kept += part.tokens
            parts.append(part)
        with self.profile.phase("optimizer"):
            trained = [p for p in self.model.parameters() if p.requires_grad]
            # DDP and FSDP2 averaged the ranks' sums: times the ranks over all kept tokens
            scale = self.dist.world / max(distributed.total(kept, self.dist), 1)
            for grad in [p.grad for p in trained if p.grad is not None]:
                grad.mul_(scale)
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
            # a NaN or Inf gradient (the same on every rank: the norm is of the reduced gradient)
            # would poison the adapter, and through the sync every engine: the update is skipped
            if torch.isfinite(grad_norm):
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts, float(grad_norm)

    def _generate(self, step: int) -> Generated:
        """The batch of `step` (in the producer's thread when async), with syncs kept out; or,
        with `rollout.in_flight: keep`, let in: the engine records the switch in each
        completion's per-token versions. On N ranks, this rank's share of the step's prompts."""
        cfg, d = self.config, self.dist
        rows = distributed.shard(batch_at(self.rows, step, cfg.rollout.prompts_per_step, cfg.optim.seed), d)
        seed = cfg.optim.seed * 100_003 + step * d.world + d.rank
        return self.generation.generate(self.tokenizer, rows, seed)

    def train_step(self, producer: Producer[Generated] | None = None) -> dict:
        """Take one step's batch (from `producer`, or generate it now), take μ optimizer steps
        over it, sync once; return the metrics."""
        cfg = self.config
        start = time.perf_counter()
        self.profile.reset()
        if producer is None:
            generated = self._generate(self.step)
            wait = generated.seconds
        else:
            generated, wait = producer.get(self.step)
        self.profile.add("generation", wait)
        current = self.generation.weight_version  # the policy this step trains, as served
        staleness = current - generated.version
        if staleness > cfg.rollout.max_staleness:
            raise StaleBatch(
                f"step {self.step + 1}: its batch was sampled at weight version {generated.version}, "
                f"{staleness} behind the engine's {current}; "
                f"rollout.max_staleness is {cfg.rollout.max_staleness}"
            )
        # μ = 1 without LoRA dropout: the update's forward pass, in eval mode (no dropout;
        # gradients flow all the same), is the current policy, so it gives the old logprobs
        # and saves a forward pass of their own (TRL does the same)
        one_pass = cfg.optim.num_iterations == 1 and cfg.lora.dropout == 0
        with self.profile.phase("score"):
            batch = score(generated, self.model, self.tokenizer, cfg, self.rewards, score_old=not one_pass)
        self.train_model.train(not one_pass)
        parts, norms = [], []
        for _ in range(cfg.optim.num_iterations):
            step_parts, norm = self._optimizer_step(batch)
            parts += step_parts
            norms.append(norm)
        # the health check: the engine's sampling logprobs against the policy that sampled
        # them, the trainer's before this update (fresh batch) or a kept snapshot (stale one)
        with self.profile.phase("health"):
            health = batch.health() if staleness == 0 else self._stale_health(batch)
        with self.profile.phase("sync"):
            report = self.generation.sync_policy()
        with self.profile.phase("health"):
            weights = self.generation.check_weights()
        self.snapshots.record(report.version)
        self.step += 1
        if producer is not None:
            producer.step_done()
        metrics = step_metrics(
            self.step, batch, parts, norms, report, self.scheduler.get_last_lr()[0],
            time.perf_counter() - start, wait, current, health,
        ) | self.generation.metrics() | weight_metrics(weights) | self.profile.metrics()
        return distributed.reduce_metrics(metrics, batch.rewards, self.dist)

    def _stale_health(self, batch: Rollout) -> dict[str, float]:
        """The health check of a stale batch on its first group, each token scored by the
        policy of the version that sampled it (two in one completion with in_flight: keep)."""
        g = self.config.rollout.num_generations
        self.model.eval()
        return self.snapshots.health(
            lambda: completion_logprobs(self.model, batch.prompts[:g], batch.completions[:g], self.tokenizer.pad_token_id)[0],
            batch.engine_logprobs[:g], batch.versions[:g], batch.mask[:g],
        )

    # -- the run -----------------------------------------------------------------------------

    def train(self, resume: bool = False, progress: bool = True) -> list[dict]:
        """Run to `optim.steps`; return the metrics of all steps in the run folder (on N ranks,
        rank 0 writes the folder; the others return the rows of this run)."""
        main = self.dist.main
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out, write=main)
        resumed = resume and self.resume() is not None
        if resumed:
            log.truncate_after(self.step)
        elif main and log.path.exists():
            log.path.unlink()  # a fresh run owns its metrics file
        if main:
            (self.out / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=2))
        # An engine as built serves the checkpoint, which a fresh adapter (B = 0) equals; a
        # resumed policy, or an engine that served anything since, needs the current policy.
        if resumed or distributed.broadcast_object(self.generation.weight_version, self.dist) > 0:
            self.generation.sync_policy()
        elif self.config.logprob_tolerance is None:  # while the engine serves the checkpoint
            self.floor.measure(self.model, self.generation.engine, task=self.config.rollout.mode == "sync")
        self.snapshots.record(self.generation.weight_version)
        steps, rollout = self.config.optim.steps, self.config.rollout
        producer = None
        if rollout.mode == "async":
            producer = Producer(self._generate, self.step, steps, rollout.max_staleness)
        bar = tqdm(total=steps, initial=self.step, desc="GRPO", disable=not (progress and main))
        try:
            while self.step < steps:
                with distributed.failures(self.dist, f"step {self.step + 1}"):
                    metrics = self.train_step(producer)
                log.write(metrics)
                self.floor.take(metrics)
                bar.update()
                bar.set_postfix(
                    reward=f"{metrics['reward_mean']:.3f}",
                    sync_ms=f"{1000 * metrics['sync_seconds']:.0f}",
                    lp_diff=f"{metrics['logprob_diff_max']:.1e}",
                )
                warning = health_warning(metrics, self.tolerance, self.floor.value)
                if warning and main:
                    tqdm.write(warning)
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
        finally:
            if producer is not None:
                producer.close()
            bar.close()
            log.close()
        self.save_checkpoint()
        rows = log.rows()
        if main:
            plot_report(rows, self.out / "report.png")
        return rows

    def sample(self, prompts: list[str], max_tokens: int, seed: int = 0) -> list[str]:
        """One low-temperature completion per prompt from the engine, for before/after reports."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        return [c.text for c in self.generation.complete(ids, max_tokens, 0.7, seed)]


def step_metrics(
    step: int, batch: Rollout, parts: list[LossParts], norms: list[float], report, lr: float,
    seconds: float, wait: float, current: int, health: dict[str, float],
) -> dict:
    """One row of metrics.jsonl."""

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    tokens = int(batch.mask.sum())
    versions = batch.versions[batch.mask]
    staleness = batch.staleness(current).float()
    return {
        "step": step,
        "reward_mean": batch.rewards.mean().item(),
        "reward_std": batch.rewards.std().item(),
        **batch.reward_stats,
        "loss": mean(p.loss.item() for p in parts),
        "kl": mean(p.kl for p in parts),
        "clip_fraction": mean(p.clip_fraction for p in parts),
        "is_weight_mean": mean(p.is_weight_mean for p in parts),
        "is_weight_max": max(p.is_weight_max for p in parts),
        "is_weight_min": min(p.is_weight_min for p in parts),
        "masked_fraction": mean(p.masked_fraction for p in parts),
        "grad_norm": mean([n for n in norms if math.isfinite(n)] or [0.0]),
        "optimizer_steps": sum(math.isfinite(n) for n in norms),
        # updates skipped for a non-finite gradient (train/health.py warns)
        "skipped_updates": sum(not math.isfinite(n) for n in norms),
        "lr": lr,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "generation_seconds": batch.seconds,
        "wait_seconds": wait,  # the trainer's wait for its batch (all of generation when sync)
        "step_seconds": seconds,
        "sync_seconds": report.seconds,
        "sync_bytes": report.bytes_sent,
        "sync_strategy": report.strategy,
        "weight_version": report.version,
        # per token: how many versions behind the trained policy its sampling policy was
        "staleness_max": int(staleness.max()) if tokens else 0,
        "staleness_mean": float(staleness.mean()) if tokens else 0.0,
        "policy_versions": sorted(set(versions.tolist())),
        **health,
    }
