"""Verification: does the engine serve the trainer's policy? Compared by logprobs, token by token.

The trainer's PeftModel (adapter active, eval mode) and the engine score the same fixed probe
sequences; the largest absolute difference of per-token logprobs is the verdict. A sync that
skipped a tensor, sent a stale one or left the prefix cache stale shows up here.

In low precision the two implementations disagree on their own: on SmolLM2-135M in bf16,
with identical weights, by up to 0.5 in a token's logprob (0.08 mean), above any fixed
tolerance a tiny model suggests. So a low-precision verdict can be judged against the
**floor**: the same comparison made before any sync, with the trainer's adapter disabled and
the engine serving the checkpoint (`measure_floor`). `judge` then accepts a difference up to
`FLOOR_FACTOR` times the floor's (max and mean), or the dtype's tolerance if that is larger.
Measured on SmolLM2 in bf16 (a random r=16 adapter, std 0.01): floor 0.42 max / 0.083 mean,
a right sync 0.40 / 0.085, a skipped one 0.98 / 0.21. What moves logprobs by less than bf16's
own noise (one module's small LoRA factors stale) cannot be seen in bf16 at all: check such
paths in float32, where the floor is ~1e-5 and the tolerance 1e-4.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorasync.sync.base import Scorer
from lorasync.sync.naming import base_name

# Default tolerances per engine dtype for `max_abs_diff`. In float32 a right sync measures
# about 5e-6 on the tiny models. In bfloat16 the merged weight W + s*B@A is rounded to the
# bf16 grid while the trainer computes the adapter branch separately, and the kernels differ:
# a right sync measured 0.04-0.05 there, a skipped or corrupted one 1 or more.
# float16 has bfloat16's tolerance: more mantissa, so no looser, and not measured on its own.
TOLERANCES = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 1e-1}


# How far above the implementations' own disagreement a low-precision sync may measure: a
# right sync measured 0.96-1.0x the floor on SmolLM2 in bf16, a skipped one 2.3-2.5x.
FLOOR_FACTOR = 1.5


def default_tolerance(dtype: str) -> float:
    """The largest |logprob diff| a right sync shows in the engine dtype called `dtype`."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; pass one (--tolerance)")
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float
    mean_abs_diff: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def probe_sequences(
    vocab_size: int, n: int = 4, length: int = 32, seed: int = 0
) -> list[list[int]]:
    """Fixed pseudo-random token sequences; ids 0 and 1 (special tokens) are left out."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (n, length), generator=gen).tolist()


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


def judged_against_floor(dtype: str, tolerance: float | None) -> bool:
    """Whether a verdict in the engine dtype `dtype` is judged against the floor: in low
    precision, unless the caller set its own tolerance."""
    return dtype != "float32" and tolerance is None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    max_bound: float  # the largest max |diff| accepted
    mean_bound: float | None  # the largest mean |diff| accepted (None: not judged)


def judge(check: Verification, tolerance: float, floor: Verification | None = None) -> Verdict:
    """Whether `check` shows the engine serving the trainer's policy: within `tolerance`, or,
    given the floor, within `FLOOR_FACTOR` of it in max and in mean."""
    if floor is None:
        return Verdict(check.max_abs_diff <= tolerance, tolerance, None)
    max_bound = max(tolerance, FLOOR_FACTOR * floor.max_abs_diff)
    # the mean's own allowance: a tenth of the tolerance, for floors near zero
    mean_bound = FLOOR_FACTOR * floor.mean_abs_diff + tolerance / 10
    return Verdict(check.max_abs_diff <= max_bound and check.mean_abs_diff <= mean_bound, max_bound, mean_bound)


def verify(model: torch.nn.Module, engine: Scorer, probes: Sequence[Sequence[int]]) -> Verification:
    """Compare the trainer's and the engine's logprobs of the probes."""
    trainer = torch.tensor(trainer_scores(model, probes))
    served = torch.tensor(engine.score(probes))
    diff = (trainer - served).abs()
    return Verification(
        max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(), tokens=diff.numel()
    )


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
