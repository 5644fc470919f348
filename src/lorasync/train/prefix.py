"""Shared-prefix scoring: each prompt of a group encoded once, not once per completion.

A GRPO batch is groups of `num_generations` completions of one prompt, and the prompt is most
of each sequence (the demo: a 46-token chat prompt, ~11 completion tokens). `shared_prefix_logprobs`
runs a group's prompt once, with gradients, keeping its keys and values, and then the group's
completions as one batch that attends to those keys and values (repeated per completion by
`Cache.batch_repeat_interleave`, a differentiable copy): the per-token logprobs and their
gradient equal the plain batch's (`rollout.completion_logprobs`) within float32 rounding, and
backward flows into the prompt once, with the group's gradients summed there (Prefix Grouper,
Liu et al., 2025, arXiv:2506.05433). transformers has no such pass for training (its
`generate` reuses a prefix's cache, without gradients), so it is written here on its public
cache API.

Groups are runs of equal consecutive prompts (how `rollout.generate` lays a batch out); a run
of one is scored as it is. The cost per group is two forward passes, so the saving is the
prompt's tokens times (group size - 1).
"""

from __future__ import annotations

import torch


def runs(prompts: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) of each run of equal consecutive prompts."""
    bounds, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            bounds.append((start, i))
            start = i
    return bounds


def shared_prefix_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rollout.completion_logprobs`'s result, (B, T) logprobs and mask, each run of equal
    prompts encoded once."""
    width = max(len(c) for c in completions)
    parts = []
    for start, end in runs(prompts):
        part = _group_logprobs(model, prompts[start], completions[start:end], pad_id)
        parts.append(torch.nn.functional.pad(part, (0, width - part.shape[1])))
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, : len(c)] = True
    return torch.cat(parts).masked_fill(~mask, 0.0), mask


def _group_logprobs(model: torch.nn.Module, prompt: list[int], group: list[list[int]], pad_id: int) -> torch.Tensor:
    """(G, w) logprobs of each completion's tokens (w: the longest; padding left as is)."""
    n, length, width = len(group), len(prompt), max(max(len(c) for c in group), 1)
    # the prompt once: its keys and values for the group, and the logits of its last
    # position, which predict every completion's first token
    head = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
    firsts = first[torch.tensor([c[0] if c else pad_id for c in group])].unsqueeze(1)
    if width == 1:
        return firsts
    # each completion but its last token, attending to the prompt's keys and values: the
    # logits at its token t predict token t + 1 (positions follow from the cache's length)
    ids = torch.full((n, width - 1), pad_id, dtype=torch.long)
    targets = torch.zeros(n, width - 1, dtype=torch.long)
    attention = torch.zeros(n, length + width - 1, dtype=torch.long)
    attention[:, :length] = 1
    for i, c in enumerate(group):
        ids[i, : max(len(c) - 1, 0)] = torch.tensor(c[:-1], dtype=torch.long)
        targets[i, : max(len(c) - 1, 0)] = torch.tensor(c[1:], dtype=torch.long)
        attention[i, length : length + max(len(c) - 1, 0)] = 1
    cache = head.past_key_values
    cache.batch_repeat_interleave(n)
    logits = model(input_ids=ids, attention_mask=attention, past_key_values=cache, use_cache=True).logits.float()
    rest = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.cat([firsts, rest], dim=1)
