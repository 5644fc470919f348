"""Verification: does the engine serve the trainer's policy? Compared by logprobs, token by token.

The trainer's PeftModel (adapter active, eval mode) and the engine score the same fixed probe
sequences; the largest absolute difference of per-token logprobs is the verdict. A sync that
skipped a tensor, sent a stale one or left the prefix cache stale shows up here.
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
