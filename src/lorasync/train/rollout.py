"""One generation batch: prompts to completions (`generate`, from the engine, each token
stamped with the weight version that sampled it), then rewards and advantages (`score`).

Also what the trainer knows about it before any update: the policy's logprobs of the sampled
tokens (GRPO's "old" logprobs) next to the engine's sampling logprobs, whose difference is the
live health check of the sync. With one policy update per batch and no dropout, the old
logprobs are the update's own forward pass, detached (`Rollout.old_logprobs` stays None until
the trainer fills it in); otherwise `score` computes them in a forward pass of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from lorasync.environments.episodes import Episode, run_episodes
from lorasync.environments.protocol import load_environment
from lorasync.sync.base import Completion, Generator
from lorasync.sync.verify import Verification
from lorasync.train.config import ConfigError, RewardSpec, TrainConfig
from lorasync.models.prompt import encode_prompt
from lorasync.train.grpo import group_advantages
from lorasync.train.prefix import shared_prefix_logprobs


def completion_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad_id: int,
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs of each completion token given prompt and earlier tokens: (B, T) plus a mask.
    With `shared_prefix`, every prefix the sequences share is encoded once (`prefix.py`; the
    same result within float32 rounding)."""
    if shared_prefix:
        return shared_prefix_logprobs(model, prompts, completions, pad_id)
    width = max(len(c) for c in completions)
    seqs = [p + c for p, c in zip(prompts, completions)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    # Logits only from the first position that predicts a completion token on: the prompts'
    # own logits are never used, and the vocabulary projection of every position is a large
    # share of the work (a fifth of SmolLM2's parameters) and of the memory.
    start = min(len(p) for p in prompts) - 1
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=length - start).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = torch.zeros(len(seqs), width, dtype=torch.float32)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not c:
            continue
        positions = torch.arange(len(p) - 1 - start, len(p) - 1 - start + len(c))
        out[i, : len(c)] = logprobs[i, positions, torch.tensor(c)]
        mask[i, : len(c)] = True
    return out, mask


@dataclass
class Rollout:
    """A generation batch, flattened group after group (`num_generations` per prompt)."""

    prompts: list[list[int]]  # the prompt of each completion
    samples: list[Completion]
    rewards: torch.Tensor  # (B,) weighted sum of the reward functions
    reward_stats: dict[str, float]
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T) the policy that generated them, per the trainer
    engine_logprobs: torch.Tensor  # (B, T) the engine's sampling logprobs
    mask: torch.Tensor  # (B, T) the policy's completion tokens (multi-turn: not the environment's)
    seconds: float = 0.0  # generation time
    versions: torch.Tensor | None = None  # (B, T) the engine's weight version of each token

    def staleness(self, version: int) -> torch.Tensor:
        """Per completion token: how many versions behind `version` its policy was."""
        return (version - self.versions)[self.mask]

    @property
    def completions(self) -> list[list[int]]:
        return [c.token_ids for c in self.samples]

    def health(self) -> dict[str, float]:
        """How far the engine's sampling logprobs are from the trainer's on the same tokens."""
        if self.old_logprobs is None:
            raise RuntimeError("the old logprobs are not known yet: the first policy update computes them")
        return health_metrics((self.old_logprobs - self.engine_logprobs)[self.mask])


def health_metrics(diffs: torch.Tensor) -> dict[str, float]:
    """The health check's row in metrics.jsonl: statistics of the per-token differences between
    the engine's and the trainer's logprobs (`verify.Verification`)."""
    check = Verification.of(diffs)
    return {
        "logprob_diff_mean": check.mean_abs_diff,
        "logprob_diff_max": check.max_abs_diff,
        "logprob_diff_quantile": check.quantile_abs_diff,
    }


def score_rewards(
    rewards: Sequence[tuple[RewardSpec, Callable]], rows: list[dict], samples: list[Completion],
    group: int, prompt_field: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the reward functions over `group` completions per row, and each
    function's mean and std. The functions get the rows' other fields as columns, and
    `truncated` (cut off by the token limit) per completion."""
    texts = [c.text for c in samples]
    prompts = [row[prompt_field] for row in rows for _ in range(group)]
    columns = {k: [row[k] for row in rows for _ in range(group)] for k in rows[0] if k != prompt_field}
    columns["truncated"] = [c.truncated for c in samples]
    total = torch.zeros(len(texts))
    stats = {}
    for spec, fn in rewards:
        values = torch.tensor(fn(prompts=prompts, completions=texts, **columns), dtype=torch.float32)
        if values.shape != total.shape:
            raise ValueError(f"reward {spec.function} returned {values.numel()} values for {len(texts)} completions")
        name = spec.function.rpartition(":")[2]
        stats[f"reward/{name}_mean"] = values.mean().item()
        stats[f"reward/{name}_std"] = values.std().item()
        total += spec.weight * values
    stats["truncated_fraction"] = sum(columns["truncated"]) / len(texts)
    return total, stats


def episode_rewards(reward: torch.Tensor, episodes: list[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward functions' sum plus each environment's own reward; 0 for a failed episode
    (its reason is logged by the runner). And the episodes' columns of metrics.jsonl."""
    own = torch.tensor([e.reward or 0.0 for e in episodes], dtype=torch.float32)
    failed = torch.tensor([e.failed for e in episodes])
    total = (reward + own).masked_fill(failed, 0.0)
    n = len(episodes)
    stats = {
        "episode/turns_mean": sum(len(e.turns) for e in episodes) / n,
        # the share of episodes in which the environment answered at least once (a tool call)
        "episode/replied_fraction": sum(e.replies > 0 for e in episodes) / n,
        "episode/failed_fraction": float(failed.float().mean()),
        "episode/tokens_mean": sum(len(e.token_ids) for e in episodes) / n,
    }
    if any(e.reward is not None for e in episodes):
        stats["reward/environment_mean"] = float(own.mean())
    for end in ("environment", "max_turns", "episode_tokens", "failed"):
        stats[f"episode/end_{end}"] = sum(e.end == end for e in episodes) / n
    return total, stats


@dataclass
class Generated:
    """One step's completions, as the engine sampled them, before any scoring."""

    rows: list[dict]
    prompts: list[list[int]]  # the prompt of each completion
    samples: list[Completion]  # `versions` filled in
    seconds: float
    version: int  # the oldest weight version that sampled any of their tokens
    # multi-turn (`rollout.environment`): each sample is a whole episode after its prompt
    episodes: list[Episode] | None = None

    def policy_mask(self, i: int) -> list[bool]:
        """Which tokens of sample `i` the policy sampled (all, single-turn)."""
        return self.episodes[i].policy if self.episodes else [True] * len(self.samples[i].token_ids)


def check_room(engine: Generator, config: TrainConfig, prompt_ids: Sequence[Sequence[int]]) -> None:
    """Refuse prompts that leave the engine no room for a whole completion (single-turn:
    `rollout.max_tokens`) or episode (`rollout.episode_tokens`): vLLM stops a sequence at its
    `max_model_len` as if at `max_tokens`, so the cut would pass for the policy's own, its
    answer scored as truncated. An engine that does not say its limit is not checked."""
    room = getattr(engine, "max_model_len", None)
    if room is None or not prompt_ids:
        return
    rollout = config.rollout
    name, tokens = (("rollout.episode_tokens", rollout.episode_tokens) if rollout.environment
                    else ("rollout.max_tokens", rollout.max_tokens))
    longest = max(len(p) for p in prompt_ids)
    need = longest + tokens
    if need > room:
        fix = (f"start the servers with --max-model-len {need} or more" if config.engine.kind == "server"
               else f"set engine.max_model_len={need} or more")
        raise ConfigError(
            f"a prompt of {longest} tokens and {name} = {tokens} need {need} tokens, "
            f"over the engine's max_model_len = {room}: {fix}, or lower {name}"
        )


def generate(engine: Generator, tokenizer, config: TrainConfig, rows: list[dict], seed: int) -> Generated:
    """Sample `num_generations` completions per row from the engine as it serves now, each
    token stamped with the weight version that sampled it.

    With `rollout.in_flight: keep` syncs may land meanwhile, and the engine (servers) reports
    each token's version. Otherwise the caller keeps syncs out (the trainer's engine lock)
    and every token gets the engine's version; a sync that got in anyway is an error, not a
    mislabelled batch."""
    g, field = config.rollout.num_generations, config.data.prompt_field
    start = time.perf_counter()
    version = engine.weight_version
    prompt_ids = [encode_prompt(tokenizer, row[field]) for row in rows]
    check_room(engine, config, prompt_ids)
    episodes = None
    if config.rollout.environment:
        episodes = run_episodes(
            engine, tokenizer, prompt_ids, rows, load_environment(config.rollout.environment),
            config.rollout.limits, config.rollout.temperature, n=g, seed=seed,
        )
        samples = [e.completion() for e in episodes]
    else:
        groups = engine.generate(prompt_ids, config.rollout.max_tokens, config.rollout.temperature, n=g, seed=seed)
        samples = [c for group in groups for c in group]
    if config.rollout.in_flight == "keep":
        if any(len(c.versions) != len(c.token_ids) for c in samples):
            raise RuntimeError(
                "rollout.in_flight: keep needs an engine that reports each token's weight version "
                f"(servers); {type(engine).__name__} did not"
            )
        oldest = min((v for c in samples for v in c.versions), default=version)
    elif engine.weight_version != version:
        raise RuntimeError(
            f"the engine's weights changed from version {version} to {engine.weight_version} "
            "while it generated: syncs must hold the trainer's engine lock"
        )
    else:
        samples, oldest = [replace(c, versions=[version] * len(c.token_ids)) for c in samples], version
    prompts = [p for p in prompt_ids for _ in range(g)]
    return Generated(rows, prompts, samples, time.perf_counter() - start, oldest, episodes)


def score(
    generated: Generated, model: torch.nn.Module, tokenizer, config: TrainConfig,
    rewards: Sequence[tuple[RewardSpec, Callable]], score_old: bool = True,
) -> Rollout:
    """Rewards and advantages of a generated batch; with `score_old`, also the policy's
    logprobs of the sampled tokens (else the caller's update fills them in)."""
    g, field = config.rollout.num_generations, config.data.prompt_field
    samples, prompts = generated.samples, generated.prompts
    reward, stats = score_rewards(rewards, generated.rows, samples, g, field)
    if generated.episodes:
        reward, episode_stats = episode_rewards(reward, generated.episodes)
        stats |= episode_stats
    old = None
    if score_old:  # the policy that generated them, as the engine serves it: no dropout
        was_training = model.training
        model.eval()
        with torch.no_grad():
            old, _ = completion_logprobs(
                model, prompts, [c.token_ids for c in samples], tokenizer.pad_token_id, config.optim.shared_prefix
            )
        model.train(was_training)
    width = max(len(c.token_ids) for c in samples)
    engine_lp = torch.zeros(len(samples), width)
    versions = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, c in enumerate(samples):
        engine_lp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
        versions[i, : len(c.versions)] = torch.tensor(c.versions, dtype=torch.long)
        mask[i, : len(c.token_ids)] = torch.tensor(generated.policy_mask(i), dtype=torch.bool)
    return Rollout(
        prompts, samples, reward, stats, group_advantages(reward, g), old, engine_lp, mask,
        generated.seconds, versions,
    )
