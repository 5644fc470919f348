"""Shared-prefix scoring: what a batch's sequences have in common encoded once.

A GRPO batch is groups of `num_generations` completions of one prompt, and the prompt is most
of each sequence (the demo: a 46-token chat prompt, ~11 completion tokens, and 27 of the
prompt's tokens, the system prompt and the chat template's, are the same in every prompt).
`shared_prefix_logprobs` lays the batch's sequences out as a prefix tree (`tree`): a node per
distinct prefix, so a group's prompt is one path, prompts share their common beginning, and
completions their common first tokens. The tree is one row of one forward pass, each node at
its depth (`position_ids`) and seeing its ancestors only (a 4D mask, which transformers uses
as given): a node's output depends only on its prefix, so it is the output each sequence
through it would get in the plain batch, and backward sums there what each of them would
send. The per-token logprobs and their gradient equal the plain batch's
(`rollout.completion_logprobs`) within float32 rounding (Prefix Grouper, Liu et al., 2025,
arXiv:2506.05433, shares a group's prompt; the tree shares any prefix). transformers has no
such pass for training (its `generate` reuses a prefix's cache, without gradients), so it is
written here on its custom-mask API.

No prefix is computed twice within a row. A row's attention grows with the square of its
nodes (the mask is dense), its projections with the nodes alone, so a batch too long for one
row is split (`rows`: consecutive sequences, at most `ROW_TOKENS` tokens a row), one tree per
row, the rows padded to the longest and run as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasync.train.distributed import unwrap


# Tokens a row holds, counted before sharing (each sequence but its last token). The row's
# attention costs about 4 * hidden * layers FLOPs per token per token of the row, its
# projections 2 * parameters per token: at 2,048 tokens attention is half the projections on
# SmolLM2-135M (hidden 576, 30 layers), under a tenth of them on a 7B model. A demo micro-batch is 16
# sequences of about 60 tokens: one row.
ROW_TOKENS = 2048


def rows(prompts: list[list[int]], completions: list[list[int]], budget: int) -> list[tuple[int, int]]:
    """(start, end) of each row: consecutive sequences, as many as fit `budget` tokens (each
    counts len(prompt) + len(completion) - 1, its tokens before sharing); a longer sequence
    gets a row of its own."""
    bounds, start, size = [], 0, 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = len(prompt) + max(len(completion) - 1, 0)
        if i > start and size + tokens > budget:
            bounds.append((start, i))
            start, size = i, 0
        size += tokens
    bounds.append((start, len(prompts)))
    return bounds


@dataclass(frozen=True)
class Tree:
    """A batch's sequences, each prompt + completion but its last token, as a prefix tree.
    Nodes come in insertion order, a parent before its children."""

    tokens: list[int]
    parents: list[int]  # -1: a root
    depths: list[int]  # the node's position in its sequences
    predictors: list[list[int]]  # per completion, per token: the node whose logits predict it


def tree(prompts: list[list[int]], completions: list[list[int]]) -> Tree:
    """Rules: a node per distinct nonempty prefix of the sequences; completion i's token t is
    predicted by the node of its sequence's first len(prompt) + t tokens."""
    children: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    predictors: list[list[int]] = []
    for prompt, completion in zip(prompts, completions):
        if not prompt:
            raise ValueError("a prompt has no tokens: nothing predicts its completion's first token")
        node, path = -1, []
        for depth, token in enumerate(prompt + completion[:-1]):
            if (node, token) not in children:
                children[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
                depths.append(depth)
            node = children[node, token]
            path.append(node)
        predictors.append(path[len(prompt) - 1:] if completion else [])
    return Tree(tokens, parents, depths, predictors)


def shared_prefix_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rollout.completion_logprobs`'s result, (B, T) logprobs and mask, every shared prefix
    of a row encoded once."""
    width = max(len(c) for c in completions)
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, : len(c)] = True
    out = torch.zeros(len(completions), width, dtype=torch.float32)
    if not mask.any():
        return out, mask
    bounds = rows(prompts, completions, ROW_TOKENS)
    layouts = [tree(prompts[start:end], completions[start:end]) for start, end in bounds]
    length = max(len(layout.tokens) for layout in layouts)
    ids = torch.full((len(layouts), length), pad_id, dtype=torch.long)
    positions = torch.zeros(len(layouts), length, dtype=torch.long)
    for r, layout in enumerate(layouts):
        ids[r, : len(layout.tokens)] = torch.tensor(layout.tokens)
        positions[r, : len(layout.tokens)] = torch.tensor(layout.depths)
    # (completion, token, row, node) of every completion token's predictor; logits only at
    # those nodes (the union over rows): the vocabulary projection is a large share of the
    # work (a fifth of SmolLM2's parameters) and of the memory
    picks = [(i, t, r, node) for r, (start, end) in enumerate(bounds) for i in range(start, end)
             for t, node in enumerate(layouts[r].predictors[i - start])]
    needed = sorted({node for *_, node in picks})
    index = {node: k for k, node in enumerate(needed)}
    logits = model(input_ids=ids, position_ids=positions, attention_mask=masks(model, layouts, length),
                   logits_to_keep=torch.tensor(needed)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    sequences = torch.tensor([i for i, *_ in picks])
    tokens = torch.tensor([t for _, t, *_ in picks])
    targets = torch.tensor([completions[i][t] for i, t, *_ in picks])
    at = torch.tensor([index[node] for *_, node in picks])
    picked = logprobs[torch.tensor([r for _, _, r, _ in picks]), at, targets]
    return out.index_put((sequences, tokens), picked), mask


def masks(model: torch.nn.Module, layouts: list[Tree], length: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The rows' attention masks, additive, (rows, 1, length, length): a node sees itself and
    its ancestors, and under a sliding window only those fewer than `window` positions back
    (as transformers counts it: q - k < window); a padding slot sees itself only. One mask, or
    one per layer type where a window splits the model's layers."""
    seen = torch.eye(length, dtype=torch.bool).repeat(len(layouts), 1, 1)
    depths = torch.zeros(len(layouts), length, dtype=torch.long)
    for r, layout in enumerate(layouts):
        for node, parent in enumerate(layout.parents):  # a parent's row is complete before its child's
            if parent >= 0:
                seen[r, node] |= seen[r, parent]
        depths[r, : len(layout.depths)] = torch.tensor(layout.depths)
    dtype = unwrap(model).get_input_embeddings().weight.dtype  # the attention's: sdpa wants it

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    layer_types = getattr(_text_config(model), "layer_types", None)
    unknown = set(layer_types or ()) - {"full_attention", "sliding_attention"}
    if unknown:  # chunked attention, for one: its mask would need a rule of its own here
        raise ValueError(f"shared-prefix scoring knows full and sliding attention layers, not {sorted(unknown)}: "
                         "set optim.shared_prefix: false for this model")
    window = _sliding_window(model)
    if window is None or int(depths.max()) < window:
        return additive(seen)
    distance = depths[:, :, None] - depths[:, None, :]
    windowed = additive(seen & (distance < window))
    if layer_types is None:  # every layer slides
        return windowed
    full = additive(seen)
    return {kind: windowed if kind == "sliding_attention" else full for kind in set(layer_types)}


def _text_config(model: torch.nn.Module):
    """The model's text config (DDP's wrapper and multimodal configs looked through), or None."""
    config = getattr(unwrap(model), "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _sliding_window(model: torch.nn.Module) -> int | None:
    """The model's attention window, if any of its layers has one."""
    config = _text_config(model)
    if config is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)
