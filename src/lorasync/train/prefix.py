"""Shared-prefix scoring: each prompt of a group encoded once, not once per completion.

A GRPO batch is groups of `num_generations` completions of one prompt, and the prompt is most
of each sequence (the demo: a 46-token chat prompt, ~11 completion tokens). `shared_prefix_logprobs`
runs the batch's distinct prompts once, with gradients, keeping their keys and values, and then
all completions as one batch that attends to their own prompt's keys and values (copied per
completion by the cache's batch selection, a differentiable index): the per-token logprobs and
their gradient equal the plain batch's (`rollout.completion_logprobs`) within float32 rounding,
and backward flows into each prompt once, with its group's gradients summed there (Prefix
Grouper, Liu et al., 2025, arXiv:2506.05433). transformers has no such pass for training (its
`generate` reuses a prefix's cache, without gradients), so it is written here on its public
cache API.

Groups are runs of equal consecutive prompts (how `rollout.generate` lays a batch out); a run
of one is scored the same way. Two forward passes per batch, whatever its groups: the prompts
(right-padded to the longest), then the completions, each placed by `position_ids` right after
its own prompt's last token, the padding between masked out. Positions and the attention it
sees are then those of the plain batch, except under a sliding window, which counts cache
slots: when a sequence could reach past the window, prompts are bucketed by length (no gap,
one pair of passes per length). The saving is each prompt's tokens times (group size - 1).
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


def buckets(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]]) -> list[list[tuple[int, int]]]:
    """The runs scored together: all of them in one pair of passes, or, where a sliding window
    could reach into the padding between a prompt and its completions, one pair per prompt
    length."""
    bounds = runs(prompts)
    window = _sliding_window(model)
    longest = max(len(p) for p in prompts) + max(len(c) for c in completions)
    if window is None or longest <= window:
        return [bounds]
    by_length: dict[int, list[tuple[int, int]]] = {}
    for start, end in bounds:
        by_length.setdefault(len(prompts[start]), []).append((start, end))
    return list(by_length.values())


def shared_prefix_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rollout.completion_logprobs`'s result, (B, T) logprobs and mask, each run of equal
    prompts encoded once."""
    width = max(len(c) for c in completions)
    parts, order = [], []
    for bucket in buckets(model, prompts, completions):
        heads = [prompts[start] for start, _ in bucket]
        groups = [completions[start:end] for start, end in bucket]
        part = _bucket_logprobs(model, heads, groups, pad_id)
        parts.append(torch.nn.functional.pad(part, (0, width - part.shape[1])))
        order += [i for start, end in bucket for i in range(start, end)]
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, : len(c)] = True
    # rows back in the batch's order (buckets by length interleave the runs)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse].masked_fill(~mask, 0.0), mask


def _bucket_logprobs(
    model: torch.nn.Module, heads: list[list[int]], groups: list[list[list[int]]], pad_id: int
) -> torch.Tensor:
    """(n, w) logprobs of each completion's tokens, group after group (w: the longest; padding
    left as is)."""
    lengths = torch.tensor([len(h) for h in heads])
    longest, shortest = int(lengths.max()), int(lengths.min())
    ids = torch.full((len(heads), longest), pad_id, dtype=torch.long)
    for j, head in enumerate(heads):
        ids[j, : len(head)] = torch.tensor(head, dtype=torch.long)
    prompt_mask = (torch.arange(longest) < lengths[:, None]).long()
    # the prompts once: their keys and values, and the logits of each one's last position,
    # which predict its completions' first tokens
    head = model(input_ids=ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=longest - shortest + 1)
    last = head.logits[torch.arange(len(heads)), lengths - shortest].float()
    flat = [c for group in groups for c in group]
    owner = torch.tensor([j for j, group in enumerate(groups) for _ in group])
    first_ids = torch.tensor([c[0] if c else pad_id for c in flat])
    firsts = torch.log_softmax(last, dim=-1)[owner, first_ids].unsqueeze(1)
    width = max(max(len(c) for c in flat), 1)
    if width == 1:
        return firsts
    # each completion but its last token, attending to its prompt's keys and values, at the
    # positions that follow its prompt: the logits at its token t predict token t + 1
    n = len(flat)
    ids = torch.full((n, width - 1), pad_id, dtype=torch.long)
    targets = torch.zeros(n, width - 1, dtype=torch.long)
    attention = torch.zeros(n, longest + width - 1, dtype=torch.long)
    attention[:, :longest] = prompt_mask[owner]
    for i, c in enumerate(flat):
        ids[i, : max(len(c) - 1, 0)] = torch.tensor(c[:-1], dtype=torch.long)
        targets[i, : max(len(c) - 1, 0)] = torch.tensor(c[1:], dtype=torch.long)
        attention[i, longest : longest + max(len(c) - 1, 0)] = 1
    positions = lengths[owner][:, None] + torch.arange(width - 1)
    cache = head.past_key_values
    sizes = {len(group) for group in groups}
    if len(sizes) == 1:
        cache.batch_repeat_interleave(sizes.pop())
    else:
        cache.batch_select_indices(owner)
    logits = model(
        input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True
    ).logits.float()
    rest = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.cat([firsts, rest], dim=1)


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The model's attention window, if any of its layers has one (DDP and FSDP wrappers and
    multimodal configs looked through)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)
