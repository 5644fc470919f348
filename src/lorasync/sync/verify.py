"""The logprob verdict: does the engine serve the trainer's policy? Compared token by token.

The trainer's PeftModel (adapter active, eval mode) and the engine score the same sequences:
several fixed sets of random token ids (`verdict_probes`) and, where there are any, the task's
own prompts and completions. A sync that skipped a tensor or sent a stale one moves these
logprobs. A stale prefix cache does not: vLLM never reads the prefix cache for prompt-logprob
requests (`skip_reading_prefix_cache`), so only generation sees it (the training health check,
which scores sampled tokens).

The two implementations disagree on their own, in every dtype: with identical weights, on
SmolLM2-135M by up to 0.5 in a token's logprob in bf16 and 4e-5 in float32, and by 2.5e-4 in
float32 on a deeper model with a 262k vocabulary; the disagreement grows with depth, vocabulary
and how extreme the probe logits are. No fixed tolerance fits every model, so the verdict is
judged against the **floor**: the same comparison made before any sync, the trainer's adapter
disabled and the engine serving the checkpoint (`measure_floor`). `judge` bounds the mean and
a high quantile by factors of the floor's, chosen from measurements (docs/verification.md):
a zero adapter measures the floor itself and passes by construction on any model.

What moves logprobs by less than the floor (one module's small LoRA factors stale, in bf16) is
the weight-level verdict's to see (`weight_check.py`), which has no noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorasync.sync.base import Generator, Scorer
from lorasync.sync.naming import base_name

# The absolute allowance per engine dtype: what a verdict judged without a floor accepts as
# max |logprob diff| (a user's `--tolerance`, or an engine already synced before it could be
# measured), and a tenth of it on top of a floor-relative bound, for floors near zero. In
# float32 a right sync measures about 5e-6 on the tiny models; in bfloat16 0.04-0.05 there.
# float16 has bfloat16's: more mantissa, so no looser, and not measured on its own.
TOLERANCES = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 1e-1}

# The high quantile judged beside the mean: robust to the one extreme token the max is ruled by.
QUANTILE = 0.99
# How far above the floor a right sync may measure, per statistic. Chosen from the measurements
# in docs/verification.md (`lorasync bench verdict`): on SmolLM2-135M, over 4 random probe sets and
# the task's own sequences, right syncs of zero and random adapters (10 syncs each, float32 and
# bf16) measured at most 1.24x the floor's mean and 1.47x its 99th percentile, and a trained
# adapter (36 steps) in bf16 1.39x and 1.97x: a policy far from the base moves further from the
# floor, so the factors leave room above that. Broken syncs in float32 measured 32x to 1e5x; in
# bf16 the large breaks 6x to 12x, while a one-step skip or one stale tensor stays inside the
# right syncs' own spread (1.05-1.06x the mean): no factor tells those apart, the weight level does.
MEAN_FACTOR = 2.0
QUANTILE_FACTOR = 3.0


def default_tolerance(dtype: str) -> float:
    """The absolute allowance for the engine dtype called `dtype` (`TOLERANCES`)."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; pass one (--tolerance)")
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class Verification:
    """Statistics of per-token |logprob diff| between the trainer and an engine."""

    max_abs_diff: float
    mean_abs_diff: float
    tokens: int
    quantile_abs_diff: float = float("nan")  # the QUANTILE-th quantile

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, diffs: torch.Tensor) -> Verification:
        """The statistics of per-token differences (any shape, signed or not)."""
        d = diffs.detach().abs().flatten().double()
        if not d.numel():
            raise ValueError("no tokens to verify")
        return cls(d.max().item(), d.mean().item(), d.numel(), d.quantile(QUANTILE).item())

    def worst(self, other: Verification) -> Verification:
        """Each statistic's larger value (a floor measured two ways)."""
        return Verification(
            max(self.max_abs_diff, other.max_abs_diff), max(self.mean_abs_diff, other.mean_abs_diff),
            self.tokens + other.tokens, max(self.quantile_abs_diff, other.quantile_abs_diff),
        )


# Random probe sets: several, so the floor's statistics do not hang on one set's extreme tokens
# (random ids drive the logits to extremes: a harder test than real text, never an easier one).
PROBE_SETS, PROBE_LENGTH, PROBES_PER_SET = 4, 32, 4


def probe_sequences(
    vocab_size: int, n: int = PROBES_PER_SET, length: int = PROBE_LENGTH, seed: int = 0
) -> list[list[int]]:
    """Fixed pseudo-random token sequences; ids 0 and 1 (special tokens) are left out."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (n, length), generator=gen).tolist()


def verdict_probes(vocab_size: int, extra: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """What a verdict scores: `PROBE_SETS` random sets, and `extra` (the task's own sequences)."""
    sets = [probe_sequences(vocab_size, seed=seed) for seed in range(PROBE_SETS)]
    return [seq for probes in sets for seq in probes] + [list(s) for s in extra]


@torch.no_grad()
def trainer_scores(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-token logprobs (tokens 1..n-1) from the trainer's model, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        scores = []
        for seq in sequences:
            ids = torch.tensor([list(seq)])
            logits = model(input_ids=ids).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist())
        return scores
    finally:
        model.train(was_training)


def measure_floor(model, engine: Scorer, probes: Sequence[Sequence[int]]) -> Verification:
    """The implementations' own disagreement: the trainer with its adapter disabled against
    the engine, which must serve the checkpoint (before any sync)."""
    with model.disable_adapter():
        return verify(model, engine, probes)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    max_bound: float | None  # the largest max |diff| accepted (None: the max is not judged)
    mean_bound: float | None  # the largest mean |diff| accepted (None: not judged)
    quantile_bound: float | None = None  # the largest QUANTILE-th |diff| accepted (None: not judged)

    def describe(self, check: Verification) -> str:
        """What was measured against what was accepted, for a log line or an error."""
        parts = [f"max {check.max_abs_diff:.3g}" + (f" (bound {self.max_bound:.3g})" if self.max_bound is not None else "")]
        if self.mean_bound is not None:
            parts.append(f"mean {check.mean_abs_diff:.3g} (bound {self.mean_bound:.3g})")
        if self.quantile_bound is not None:
            parts.append(f"p{100 * QUANTILE:g} {check.quantile_abs_diff:.3g} (bound {self.quantile_bound:.3g})")
        return ", ".join(parts)


def judge(check: Verification, tolerance: float, floor: Verification | None = None) -> Verdict:
    """Whether `check` shows the engine serving the trainer's policy.

    Given the floor (the same comparison before any sync, `measure_floor`), in every dtype:
    the mean within `MEAN_FACTOR` of the floor's and the `QUANTILE`-th quantile within
    `QUANTILE_FACTOR` of the floor's, each plus a tenth of `tolerance`. A right sync of a zero
    adapter measures the floor itself, so it passes by construction; the max, ruled by a single
    extreme token, is reported but not judged. Without a floor: max within `tolerance`.
    """
    if floor is None:
        return Verdict(check.max_abs_diff <= tolerance, tolerance, None)
    mean_bound = MEAN_FACTOR * floor.mean_abs_diff + tolerance / 10
    quantile_bound = QUANTILE_FACTOR * floor.quantile_abs_diff + tolerance / 10
    ok = check.mean_abs_diff <= mean_bound and check.quantile_abs_diff <= quantile_bound
    return Verdict(ok, None, mean_bound, quantile_bound)


def verify(model: torch.nn.Module, engine: Scorer, probes: Sequence[Sequence[int]]) -> Verification:
    """Compare the trainer's and the engine's logprobs of the probes."""
    trainer = torch.cat([torch.tensor(s) for s in trainer_scores(model, probes)])
    served = torch.cat([torch.tensor(s) for s in engine.score(probes)])
    return Verification.of(trainer - served)


def verify_generation(
    model: torch.nn.Module, engine: Generator, prompts: Sequence[Sequence[int]], max_tokens: int, seed: int
) -> Verification:
    """Compare the engine's sampling logprobs of completions it generates from `prompts` with
    the trainer's on the same tokens: what training's health check compares. Unlike `verify`'s
    prompt logprobs, generation reads vLLM's prefix cache, so this sees a cache left stale."""
    return _generated_against(engine, prompts, max_tokens, seed, lambda seqs: trainer_scores(model, seqs))


def _generated_against(
    engine: Generator, prompts: Sequence[Sequence[int]], max_tokens: int, seed: int,
    score: Callable[[list[list[int]]], list[list[float]]],
) -> Verification:
    """The engine's sampling logprobs of one completion per prompt, against `score`'s logprobs
    of the same tokens (the trainer's, or the engine's own prompt logprobs)."""
    outs = engine.generate(prompts, max_tokens, temperature=1.0, seed=seed)
    completions = [group[0] for group in outs]
    sequences = [list(p) + c.token_ids for p, c in zip(prompts, completions)]
    scored = [s[len(s) - len(c.token_ids):] for s, c in zip(score(sequences), completions)]
    diffs = [torch.tensor(s) - torch.tensor(c.logprobs) for s, c in zip(scored, completions) if c.token_ids]
    return Verification.of(torch.cat(diffs))


# The cache level's probes: prompts longer than one prefix-cache block (vLLM's CPU default is
# 128 tokens), so their first block is cached by the first request that reads them.
CACHE_PROBES, CACHE_PROBE_LENGTH, CACHE_TOKENS = 8, 200, 16


def cache_probes(vocab_size: int) -> list[list[int]]:
    """The fixed long prompts `verify_cache` generates from."""
    return probe_sequences(vocab_size, CACHE_PROBES, CACHE_PROBE_LENGTH, seed=100)


def verify_cache(engine, prompts: Sequence[Sequence[int]], seed: int = 0,
                 max_tokens: int = CACHE_TOKENS) -> Verification:
    """The cache level: the engine against itself. It generates from `prompts` (generation
    reads vLLM's prefix cache) and scores the same tokens by prompt logprobs (scoring never
    reads it), and the two are compared. No trainer takes part, so its noise does not either:
    on an AVX-512 CPU they agreed bit for bit while the cache was right (SmolLM2 in bf16, a
    tiny qwen2 in float32; docs/verification.md; other ISAs and GPUs are judged against the
    floor `measure_cache_floor` takes there), and keys and values of old weights left in
    the cache, which neither the weights nor the trainer's comparison can see in bf16, show as
    a difference. `engine` is a `Generator` and a `Scorer`."""
    return _generated_against(engine, prompts, max_tokens, seed, engine.score)


def measure_cache_floor(engine, prompts: Sequence[Sequence[int]]) -> Verification:
    """`verify_cache` while the cache is right: once to fill it, then again reading it."""
    verify_cache(engine, prompts, seed=0)
    return verify_cache(engine, prompts, seed=1)


@torch.no_grad()
def base_weight_change(model: torch.nn.Module, model_dir: str | Path) -> float:
    """Largest absolute change of the trainer's frozen base weights against the checkpoint."""
    base = {}
    for name, param in model.named_parameters():
        ckpt = base_name(name)
        if ckpt is not None:
            base[ckpt] = param
    worst = 0.0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for ckpt in f.keys():
                if ckpt in base:
                    param = base[ckpt].detach()
                    original = f.get_tensor(ckpt).to(param.dtype)
                    worst = max(worst, (param - original).abs().max().float().item())
    return worst
