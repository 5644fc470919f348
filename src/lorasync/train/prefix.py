"""Shared-prefix scoring: what a batch's sequences have in common encoded once.

A GRPO batch is groups of `num_generations` completions of one prompt, and the prompt is most
of each sequence (the demo: a 46-token chat prompt, ~11 completion tokens, and 27 of the
prompt's tokens, the system prompt and the chat template's, are the same in every prompt).
`shared_prefix_logprobs` lays the batch's sequences out as a prefix tree (`tree`): a node per
distinct prefix, so a group's prompt is one path, prompts share their common beginning, and
completions their common first tokens. The whole tree is one row of one forward pass, each
node at its depth (`position_ids`) and seeing its ancestors only (a 4D mask, which transformers
uses as given): a node's output depends only on its prefix, so it is the output each sequence
through it would get in the plain batch, and backward sums there what each of them would
send. The per-token logprobs and their gradient equal the plain batch's
(`rollout.completion_logprobs`) within float32 rounding (Prefix Grouper, Liu et al., 2025,
arXiv:2506.05433, shares a group's prompt; the tree shares any prefix). transformers has no
such pass for training (its `generate` reuses a prefix's cache, without gradients), so it is
written here on its custom-mask API.

No token is padding and none is computed twice. The price: the mask is (nodes x nodes), and a
node's attention spans the row, so attention grows with the square of a micro-batch's tokens
while the projections, most of the work at these lengths, grow with the tokens alone.
`optim.grad_accum` bounds the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    encoded once (`pad_id` unused: nothing is padded)."""
    layout = tree(prompts, completions)
    width = max(len(c) for c in completions)
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, : len(c)] = True
    out = torch.zeros(len(completions), width, dtype=torch.float32)
    if not mask.any():
        return out, mask
    # logits at the nodes that predict a completion token only: the vocabulary projection is
    # a large share of the work (a fifth of SmolLM2's parameters) and of the memory
    needed = sorted({node for row in layout.predictors for node in row})
    index = {node: k for k, node in enumerate(needed)}
    logits = model(
        input_ids=torch.tensor([layout.tokens]), position_ids=torch.tensor([layout.depths]),
        attention_mask=masks(model, layout), logits_to_keep=torch.tensor(needed),
    ).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    rows, cols = mask.nonzero(as_tuple=True)
    at = torch.tensor([index[layout.predictors[i][t]] for i, t in zip(rows.tolist(), cols.tolist())])
    targets = torch.tensor([completions[i][t] for i, t in zip(rows.tolist(), cols.tolist())])
    return out.index_put((rows, cols), logprobs[at, targets]), mask


def masks(model: torch.nn.Module, layout: Tree) -> torch.Tensor | dict[str, torch.Tensor]:
    """The row's attention masks, additive, (1, 1, nodes, nodes): a node sees itself and its
    ancestors, and under a sliding window only those fewer than `window` positions back (as
    transformers counts it: q - k < window). One mask, or one per layer type where a window
    splits the model's layers."""
    n = len(layout.tokens)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for node, parent in enumerate(layout.parents):  # a parent's row is complete before its child's
        if parent >= 0:
            seen[node] = seen[parent]
        seen[node, node] = True
    depths = torch.tensor(layout.depths)
    distance = depths[:, None] - depths[None, :]
    dtype = _unwrapped(model).get_input_embeddings().weight.dtype  # the attention's: sdpa wants it

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    window = _sliding_window(model)
    if window is None or int(depths.max()) < window:
        return additive(seen)
    windowed = additive(seen & (distance < window))
    layer_types = getattr(_text_config(model), "layer_types", None)
    if layer_types is None:  # every layer slides
        return windowed
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"shared-prefix scoring knows full and sliding attention layers, not {sorted(unknown)}: "
                         "set optim.shared_prefix: false for this model")
    full = additive(seen)
    return {kind: windowed if kind == "sliding_attention" else full for kind in set(layer_types)}


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's wrapper (FSDP2 shards in place)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def _text_config(model: torch.nn.Module):
    """The model's text config (multimodal configs looked through), or None."""
    config = getattr(_unwrapped(model), "config", None)
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
