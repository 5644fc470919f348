"""The GRPO trainer: a PEFT LoRA policy, a vLLM generator, and a verified sync after every step.

One step: draw prompts; sample `num_generations` completions per prompt from the engine;
score them with the reward functions; compute group-relative advantages; run the clipped,
importance-corrected policy-gradient loss (grpo.py) over `grad_accum` micro-batches; take one
optimizer step; sync the new adapter into the engine. Every step also measures how far the
engine's sampling logprobs are from the trainer's on the same tokens: the live health check
of the sync.

The trainer talks to the engine through `Generator` (generate) and the sync's
`WeightReceiver` only; it knows nothing of vLLM.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from lorasync.config import TrainConfig, config_to_dict
from lorasync.data import batch_at, load_rows
from lorasync.engine import DTYPES, Completion
from lorasync.grpo import group_advantages, grpo_loss
from lorasync.metrics import MetricsLog, plot_report
from lorasync.rewards import load_reward
from lorasync.sync import WeightReceiver, WeightSync
from lorasync.verify import TOLERANCES

CHECKPOINTS = "checkpoints"


class Generator(WeightReceiver, Protocol):
    """An engine the trainer can sample from and sync into."""

    def generate(
        self, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float = 1.0,
        n: int = 1, seed: int | None = None,
    ) -> list[list[Completion]]: ...


def completion_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs of each completion token given prompt and earlier tokens: (B, T) plus a mask."""
    width = max(len(c) for c in completions)
    seqs = [p + c for p, c in zip(prompts, completions)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = torch.zeros(len(seqs), width, dtype=torch.float32)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not c:
            continue
        positions = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        out[i, : len(c)] = logprobs[i, positions, torch.tensor(c)]
        mask[i, : len(c)] = True
    return out, mask


class GRPOTrainer:
    """GRPO with a LoRA policy; `train()` runs `optim.steps` steps and writes the run folder."""

    def __init__(self, config: TrainConfig, engine: Generator) -> None:
        self.config = config
        self.engine = engine
        self.out = Path(config.output_dir)
        torch.manual_seed(config.optim.seed)
        random.seed(config.optim.seed)
        self.rows = load_rows(config.data)
        self.rewards = [(spec, load_reward(spec.function)) for spec in config.rewards]
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.base)
        base = AutoModelForCausalLM.from_pretrained(config.model.base, dtype=DTYPES[config.model.dtype])
        lora = config.lora
        targets = lora.targets[0] if lora.targets == ["all-linear"] else list(lora.targets)
        self.model: PeftModel = get_peft_model(
            base,
            LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets),
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr)
        self.scheduler = get_scheduler(
            config.optim.schedule, self.optimizer, config.optim.warmup_steps, config.optim.steps
        )
        self.sync = WeightSync(self.model, engine, config.sync_strategy)
        self.tolerance = config.logprob_tolerance or TOLERANCES[config.model.dtype]
        self.step = 0

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Adapter (PEFT format), optimizer and scheduler state, and the step."""
        path = self.out / CHECKPOINTS / f"step-{self.step:06d}"
        self.model.save_pretrained(path / "adapter")
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            path / "optimizer.pt",
        )
        (path / "trainer_state.json").write_text(
            json.dumps({"step": self.step, "config": config_to_dict(self.config)}, indent=2)
        )
        return path

    def resume(self) -> Path | None:
        """Load the latest checkpoint in the output folder, if there is one."""
        found = sorted((self.out / CHECKPOINTS).glob("step-*"))
        if not found:
            return None
        path = found[-1]
        state = json.loads((path / "trainer_state.json").read_text())
        weights = load_file(path / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(self.model, weights)
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = state["step"]
        return path

    # -- one step ----------------------------------------------------------------------------

    def _score(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict]:
        """Weighted sum of the reward functions, and each one's mean and std."""
        g = self.config.rollout.num_generations
        field = self.config.data.prompt_field
        prompts = [row[field] for row in rows for _ in range(g)]
        columns = {k: [row[k] for row in rows for _ in range(g)] for k in rows[0] if k != field}
        total = torch.zeros(len(texts))
        stats = {}
        for spec, fn in self.rewards:
            values = torch.tensor(fn(prompts=prompts, completions=texts, **columns), dtype=torch.float32)
            if values.shape != total.shape:
                raise ValueError(
                    f"reward {spec.function} returned {values.numel()} values for {len(texts)} completions"
                )
            name = spec.function.rpartition(":")[2]
            stats[f"reward/{name}_mean"] = values.mean().item()
            stats[f"reward/{name}_std"] = values.std().item()
            total += spec.weight * values
        return total, stats

    def train_step(self) -> dict:
        cfg, g = self.config, self.config.rollout.num_generations
        start = time.perf_counter()
        rows = batch_at(self.rows, self.step, cfg.rollout.prompts_per_step, cfg.optim.seed)
        prompt_ids = [
            self.tokenizer(row[cfg.data.prompt_field]).input_ids for row in rows
        ]
        groups = self.engine.generate(
            prompt_ids, cfg.rollout.max_tokens, cfg.rollout.temperature, n=g,
            seed=cfg.optim.seed * 100_003 + self.step,
        )
        gen_seconds = time.perf_counter() - start
        samples = [c for group in groups for c in group]
        prompts = [p for p in prompt_ids for _ in range(g)]
        completions = [c.token_ids for c in samples]
        rewards, reward_stats = self._score(rows, [c.text for c in samples])
        advantages = group_advantages(rewards, g)

        self.model.train()
        with torch.no_grad():
            old, mask = completion_logprobs(self.model, prompts, completions, self.tokenizer.pad_token_id)
        engine_lp = torch.zeros_like(old)
        for i, c in enumerate(samples):
            engine_lp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        diff = (old - engine_lp).abs()[mask]

        micro = len(samples) // cfg.optim.grad_accum
        parts = []
        for k in range(cfg.optim.grad_accum):
            s = slice(k * micro, (k + 1) * micro)
            logprobs, m = completion_logprobs(self.model, prompts[s], completions[s], self.tokenizer.pad_token_id)
            ref = None
            if cfg.optim.beta > 0:
                with torch.no_grad(), self.model.disable_adapter():
                    ref, _ = completion_logprobs(self.model, prompts[s], completions[s], self.tokenizer.pad_token_id)
            width = logprobs.shape[1]
            part = grpo_loss(
                logprobs, old[s, :width], engine_lp[s, :width], advantages[s], m,
                cfg.optim.clip_eps, cfg.optim.is_cap, cfg.optim.beta, ref,
            )
            (part.loss / cfg.optim.grad_accum).backward()
            parts.append(part)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], cfg.optim.max_grad_norm
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        report = self.sync()
        self.step += 1
        tokens = int(mask.sum())
        seconds = time.perf_counter() - start
        return {
            "step": self.step,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            **reward_stats,
            "loss": sum(p.loss.item() for p in parts) / len(parts),
            "kl": sum(p.kl for p in parts) / len(parts),
            "clip_fraction": sum(p.clip_fraction for p in parts) / len(parts),
            "is_weight_mean": sum(p.is_weight_mean for p in parts) / len(parts),
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "completion_tokens": tokens,
            "tokens_per_second": tokens / seconds,
            "generation_seconds": gen_seconds,
            "step_seconds": seconds,
            "sync_seconds": report.seconds,
            "sync_bytes": report.bytes_sent,
            "weight_version": report.version,
            "logprob_diff_mean": diff.mean().item(),
            "logprob_diff_max": diff.max().item(),
        }

    # -- the run -----------------------------------------------------------------------------

    def train(self, resume: bool = False, progress: bool = True) -> list[dict]:
        """Run to `optim.steps`; return the metrics of all steps in the run folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out)
        if resume and self.resume() is not None:
            log.truncate_after(self.step)
        elif not resume and log.path.exists():
            log.path.unlink()  # a fresh run owns its metrics file
        (self.out / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=2))
        self.sync()  # the engine starts from the base checkpoint; serve the current policy
        bar = tqdm(
            total=self.config.optim.steps, initial=self.step, desc="GRPO", disable=not progress
        )
        try:
            while self.step < self.config.optim.steps:
                metrics = self.train_step()
                log.write(metrics)
                bar.update()
                bar.set_postfix(
                    reward=f"{metrics['reward_mean']:.3f}",
                    sync_ms=f"{1000 * metrics['sync_seconds']:.0f}",
                    lp_diff=f"{metrics['logprob_diff_max']:.1e}",
                )
                if metrics["logprob_diff_max"] > self.tolerance:
                    tqdm.write(
                        f"warning: step {self.step}: engine/trainer logprob diff "
                        f"{metrics['logprob_diff_max']:.3g} > tolerance {self.tolerance:.3g}: "
                        "the engine is not serving the trained policy"
                    )
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        self.save_checkpoint()
        rows = log.rows()
        plot_report(rows, self.out / "report.png")
        return rows

    def sample(self, prompts: list[str], max_tokens: int, seed: int = 0) -> list[str]:
        """One low-temperature completion per prompt from the engine, for before/after reports."""
        ids = [self.tokenizer(p).input_ids for p in prompts]
        outs = self.engine.generate(ids, max_tokens, temperature=0.7, n=1, seed=seed)
        return [group[0].text for group in outs]
