"""GRPO's arithmetic: group-relative advantages and the clipped, importance-corrected loss.

Pure tensor functions, no model and no engine, so each piece is testable on its own. The loss
follows GRPO (Shao et al., 2024, arXiv:2402.03300) as TRL implements it, with these choices:
1. `num_iterations` (μ) policy updates per generation batch; the "old" logprobs are those of
   the policy that generated the batch, computed once before the first update (without
   dropout, as the engine serves it). With μ = 1 the ratio is 1 and the clip acts through the
   gradient only; later iterations clip against the generating policy;
2. the token-level mean over all completion tokens of the batch (no per-sequence mean),
   so long completions are not down-weighted;
3. a truncated importance weight min(exp(trainer - engine), cap) on each token corrects for
   the engine sampling from another policy than the trainer's: slightly different numbers
   (synchronous runs), or a policy up to `max_staleness` versions old (asynchronous ones,
   docs/async.md: the engine's sampling logprobs are the behaviour policy, the trainer's
   "old" logprobs the proximal one, as in decoupled PPO). With `is_mask`, tokens whose
   weight falls outside [1/cap, cap] are also left out of the loss;
4. KL to the reference (the adapter disabled) uses the k3 estimator exp(r) - r - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(reward - group mean) / (group std + eps) for rewards laid out group after group."""
    if rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}: "
            "each prompt needs exactly num_generations completions"
        )
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    return ((grouped - mean) / (std + eps)).view(-1)


@dataclass
class LossParts:
    loss: torch.Tensor
    kl: float
    clip_fraction: float
    is_weight_mean: float  # as it enters the loss: truncated, over the kept tokens
    is_weight_max: float  # before truncation, over all completion tokens
    is_weight_min: float
    masked_fraction: float  # tokens left out by `is_mask`
    tokens: int = 0  # tokens the loss averages over (the completion tokens `is_mask` kept)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    is_cap: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    is_mask: bool = False,
) -> LossParts:
    """Per-token clipped policy-gradient loss, averaged over the completion tokens in `mask`.

    Shapes: (batch, tokens) for the logprobs and `mask`, (batch,) for `advantages`.
    """
    mask = mask.bool()
    raw_weight = torch.exp(old_logprobs - engine_logprobs).detach()
    kept = mask
    if is_mask:
        kept = mask & (raw_weight <= is_cap) & (raw_weight >= 1 / is_cap)
    tokens_in = mask.sum().clamp_min(1)
    masked_fraction = float((mask & ~kept).sum() / tokens_in)
    weights = raw_weight[mask] if mask.any() else torch.ones(1)
    mask = kept.float()
    tokens = mask.sum().clamp_min(1)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.min(unclipped, clipped)
    is_weight = raw_weight.clamp(max=is_cap)
    per_token = per_token * is_weight
    kl = torch.zeros((), dtype=logprobs.dtype)
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs (the policy with the adapter disabled)")
        log_ratio = ref_logprobs - logprobs
        per_token_kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum() / tokens
    loss = (per_token * mask).sum() / tokens
    clipped_tokens = ((ratio - 1).abs() > clip_eps).float()
    return LossParts(
        loss=loss,
        kl=float(kl.detach()),
        clip_fraction=float((clipped_tokens * mask).sum() / tokens),
        is_weight_mean=float((is_weight * mask).sum() / tokens),
        is_weight_max=float(weights.max()),
        is_weight_min=float(weights.min()),
        masked_fraction=masked_fraction,
        tokens=int(mask.sum()),
    )
