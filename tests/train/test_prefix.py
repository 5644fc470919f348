"""Shared-prefix scoring (`train/prefix.py`) is exact: per-token logprobs and the LoRA gradient
equal the plain batch's (`rollout.completion_logprobs`) within float32 rounding, on tiny qwen2,
llama, gemma3 (sliding-window and full layers) and gpt2 (absolute positions) models, with
prompts of different lengths in one batch, completions of different lengths (padding), a
group of one, and a completion of one token; and each prompt goes through the model once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasync.train.prefix import runs, shared_prefix_logprobs
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


def test_runs_are_the_groups_of_equal_consecutive_prompts():
    assert runs([[1], [1], [2], [1], [1], [1]]) == [(0, 2), (2, 3), (3, 6)]
    assert runs([[1, 2]]) == [(0, 1)]


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


def test_a_sliding_window_buckets_prompts_by_length_and_needs_to(tiny_model, monkeypatch):
    """gemma3's window (8 slots) would reach into the padding between a short prompt and its
    completions: prompts are scored per length, and scored together they would be wrong."""
    import lorasync.train.prefix as prefix

    model = policy(tiny_model("gemma3"), seed=1)
    model.eval()
    prompts, completions = batch(model.config.vocab_size)
    assert [len(b) for b in prefix.buckets(model, prompts, completions)] == [1, 1, 1]
    assert [len(b) for b in prefix.buckets(policy(tiny_model("llama")), prompts, completions)] == [3]
    monkeypatch.setattr(prefix, "buckets", lambda model, prompts, completions: [prefix.runs(prompts)])
    logprob_diff, _ = differences(model, prompts, completions)
    assert logprob_diff > 1e-3


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
    # one pair of passes: the prompts once, padded to the longest, then the completions but
    # their last token, padded to the longest
    longest = max(len(p) for p in prompts)
    assert shared_tokens == len(runs(prompts)) * longest + len(prompts) * (max(len(c) for c in completions) - 1)
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
