"""Shared-prefix scoring (`train/prefix.py`) is exact: per-token logprobs and the LoRA gradient
equal the plain batch's (`rollout.completion_logprobs`) within float32 rounding, on tiny qwen2,
llama, gemma3 (sliding-window and full layers) and gpt2 (absolute positions) models, with
prompts of different lengths in one batch, completions of different lengths (packed), a
group of one, and a completion of one token; each prompt goes through the model once, and a
packed token sees only its prompt and its own completion."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasync.train.prefix import masks, rows, shared_prefix_logprobs, tree
from lorasync.train.rollout import completion_logprobs
from tests.helpers import ReplayEngine, demo_trainer_config, policy

ARCHS = ["qwen2", "llama", "gemma3", "gpt2"]


GROUPS = {"uneven": [(9, 3), (14, 2), (5, 1)], "even": [(9, 2), (14, 2), (9, 2)]}


def batch(vocab: int, seed: int = 0, groups: str = "uneven") -> tuple[list[list[int]], list[list[int]]]:
    """Groups of prompts of different lengths ("uneven": 3, 2 and 1 completions of prompts of
    9, 14 and 5 tokens; "even": 2 completions each, two prompts of one length), completions of
    1 to 7 tokens, flattened group after group as `rollout.generate` lays them out."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for length, size in GROUPS[groups]:
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        for k in range(size):
            prompts.append(prompt)
            completions.append([rng.randrange(3, vocab) for _ in range(1 if k == 1 else rng.randint(2, 7))])
    return prompts, completions


def scored(model, fn, prompts, completions, weights):
    """The logprobs, mask, and the gradient of sum(weights * logprobs) over the adapter."""
    model.zero_grad(set_to_none=True)
    logprobs, mask = fn(model, prompts, completions, 0)
    (logprobs * weights[:, : logprobs.shape[1]] * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logprobs.detach(), mask, grads


def test_the_tree_has_a_node_per_distinct_prefix():
    # sequences but their last token: [1, 2, 5] twice, then [1, 3]
    layout = tree([[1, 2], [1, 2], [1, 3]], [[5, 6], [5, 7], [8]])
    assert layout.tokens == [1, 2, 5, 3]
    assert layout.parents == [-1, 0, 1, 0]
    assert layout.depths == [0, 1, 2, 1]
    assert layout.predictors == [[1, 2], [1, 2], [3]]
    assert tree([[4]], [[]]).predictors == [[]]


def test_rows_take_consecutive_sequences_up_to_the_budget():
    prompts, completions = [[1] * 4] * 4, [[2] * 3, [2] * 5, [], [2] * 9]  # tokens 6, 8, 4, 12
    assert rows(prompts, completions, 14) == [(0, 2), (2, 3), (3, 4)]  # 12 alone: over, own row
    assert rows(prompts, completions, 30) == [(0, 4)]
    assert rows(prompts, completions, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def path(layout, node: int) -> list[int]:
    tokens = []
    while node >= 0:
        tokens.append(layout.tokens[node])
        node = layout.parents[node]
    return tokens[::-1]


sequences = st.lists(st.integers(0, 3), min_size=1, max_size=5)


@given(st.lists(st.tuples(sequences, st.lists(st.integers(0, 3), max_size=4)), min_size=1, max_size=6))
def test_each_predictor_is_its_tokens_prefix_and_no_prefix_is_a_node_twice(batch):
    prompts, completions = [p for p, _ in batch], [c for _, c in batch]
    layout = tree(prompts, completions)
    for prompt, completion, predictors in zip(prompts, completions, layout.predictors):
        assert [path(layout, node) for node in predictors] == [(prompt + completion)[: len(prompt) + t]
                                                               for t in range(len(completion))]
    prefixes = {tuple((p + c[:-1])[:k]) for p, c in zip(prompts, completions) for k in range(1, len(p + c[:-1]) + 1)}
    assert sorted(tuple(path(layout, node)) for node in range(len(layout.tokens))) == sorted(prefixes)
    assert all(layout.depths[node] == len(path(layout, node)) - 1 for node in range(len(layout.tokens)))
    assert all(parent < node for node, parent in enumerate(layout.parents))


def differences(model, prompts, completions) -> tuple[float, float]:
    """Max |logprob difference| and max relative gradient difference, shared prefix against
    the plain batch; the masks and the zeroed padding checked on the way."""
    weights = torch.randn(len(completions), 8, generator=torch.Generator().manual_seed(0))
    plain, plain_mask, plain_grads = scored(model, completion_logprobs, prompts, completions, weights)
    shared, mask, grads = scored(model, shared_prefix_logprobs, prompts, completions, weights)
    assert torch.equal(mask, plain_mask)
    assert (shared[~mask] == 0).all()
    assert grads.keys() == plain_grads.keys() and grads
    relative = max(
        ((grad - plain_grads[name]).norm() / plain_grads[name].norm().clamp_min(1e-12)).item()
        for name, grad in grads.items()
    )
    return (shared - plain).abs().max().item(), relative


@pytest.mark.parametrize("groups", sorted(GROUPS))
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_logprobs_and_gradient_equal_the_plain_batch(tiny_model, arch, groups):
    model = policy(tiny_model(arch), seed=1)
    model.eval()  # no dropout: the two passes must see the same function
    logprob_diff, grad_diff = differences(model, *batch(model.config.vocab_size, groups=groups))
    assert logprob_diff <= 1e-5
    assert grad_diff <= 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_batch_split_into_rows_scores_the_same(tiny_model, arch, monkeypatch):
    """A budget of 20 tokens a row: the uneven batch (sequences of 9-20 tokens) takes 5 rows of
    different lengths (padding slots among them; the last holds two prompts), and still
    equals the plain batch."""
    import lorasync.train.prefix as prefix

    monkeypatch.setattr(prefix, "ROW_TOKENS", 20)
    model = policy(tiny_model(arch), seed=1)
    model.eval()
    prompts, completions = batch(model.config.vocab_size)
    assert rows(prompts, completions, 20) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]
    logprob_diff, grad_diff = differences(model, prompts, completions)
    assert logprob_diff <= 1e-5
    assert grad_diff <= 1e-5


def test_a_sliding_window_is_kept_and_needs_to_be(tiny_model, monkeypatch):
    """gemma3's sliding layers see 8 positions back; its packed rows reach further (prompts of
    up to 14 tokens, completions of up to 7), so their masks must hold the window: scored
    with every layer's mask full, the logprobs are wrong."""
    import lorasync.train.prefix as prefix

    model = policy(tiny_model("gemma3"), seed=1)
    model.eval()
    prompts, completions = batch(model.config.vocab_size)
    assert model.config.sliding_window == 8
    assert max(len(p) + len(c) for p, c in zip(prompts, completions)) > 8
    monkeypatch.setattr(prefix, "_sliding_window", lambda model: None)
    logprob_diff, _ = differences(model, prompts, completions)
    assert logprob_diff > 1e-3


def test_a_node_sees_itself_and_its_ancestors_only():
    """[1, 2, 5] and [1, 3] as nodes 0-3 (node 3 is 3's, a child of 1's); under a window of 2
    positions, node 2 (depth 2) no longer sees node 0 (depth 0)."""
    layout = tree([[1, 2], [1, 3]], [[5, 6], [7]])
    embeddings = torch.nn.Embedding(8, 2)
    plain = SimpleNamespace(get_input_embeddings=lambda: embeddings)
    seen = masks(plain, [layout], 4)[0, 0] == 0
    assert seen.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, False, False, True],
    ]
    slides = SimpleNamespace(config=SimpleNamespace(sliding_window=2),  # every layer
                             get_input_embeddings=lambda: embeddings)
    seen = masks(slides, [layout], 4)[0, 0] == 0
    assert seen[2].tolist() == [False, True, True, False]
    chunked = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention", "chunked_attention"]),
                              get_input_embeddings=lambda: embeddings)
    with pytest.raises(ValueError, match=r"not \['chunked_attention'\]: set optim.shared_prefix: false"):
        masks(chunked, [layout], 4)


def test_each_prompt_goes_through_the_model_once(tiny_model):
    model = policy(tiny_model("qwen2"))
    prompts, completions = batch(model.config.vocab_size)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        with torch.no_grad():
            shared_prefix_logprobs(model, prompts, completions, 0)
            shared_tokens = sum(seen)
            seen.clear()
            completion_logprobs(model, prompts, completions, 0)
    finally:
        hook.remove()
    # one pass, a token per distinct prefix: each prompt once, with its completions
    assert shared_tokens == len(tree(prompts, completions).tokens)
    assert shared_tokens < sum(len(p) for p in {tuple(p) for p in prompts}) + sum(len(c) for c in completions)
    assert sum(seen) == len(prompts) * max(len(p) + len(c) for p, c in zip(prompts, completions))


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((out / "checkpoints").glob("step-*"))[-1] / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # two short runs: about 2.5 s
def test_a_run_with_shared_prefix_ends_where_the_plain_run_does(tiny_model, tmp_path):
    """Two steps of the tiny demo on fixed generations (`ReplayEngine`), two policy updates a
    batch (so the old logprobs come from a pass of their own) and a KL term (the reference
    pass shares the prefix too), in two micro-batches: the losses agree within 1e-6 (measured:
    1e-10) and the adapters within 2e-6. Adam turns a gradient's rounding into a step of up to
    lr where the gradient is near zero, so the adapters' bound scales with lr: measured 2.8e-7
    at lr 1e-4 (this test), 1e-5 to 2e-5 at 2e-3."""
    from lorasync.train.trainer import GRPOTrainer

    model_dir = tiny_model("qwen2")
    rows, adapters = [], []
    for shared in (False, True):
        out = tmp_path / f"shared-{shared}"
        config = demo_trainer_config(
            model_dir, out, steps=2,
            optim={"lr": 1e-4, "num_iterations": 2, "beta": 0.05, "grad_accum": 2, "shared_prefix": shared},
        )
        GRPOTrainer(config, ReplayEngine(model_dir)).train(progress=False)
        rows.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
        adapters.append(final_adapter(out))
    plain, shared = adapters
    assert plain.keys() == shared.keys() and max(t.abs().max().item() for t in plain.values()) > 1e-4
    assert max((plain[k] - shared[k]).abs().max().item() for k in plain) <= 2e-6
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
