"""Where a step's time goes: seconds by phase, and the rate the trainer's passes reached.

`StepProfile` times the phases of one step (`phase(name)`, a context manager; a phase entered
twice adds up) and counts the tokens the policy's forward passes take (a hook on its input
embeddings; passes with gradients apart, since their backward costs about as much again).
`metrics()` is the step's row: `seconds_<phase>` for every phase of `PHASES` (0 where it did
not run), `trainer_tokens`, and `trainer_gflops`: an estimate of the passes' floating-point
rate, 2 FLOPs per body parameter per token forward and as many again backward (the gradient
of the activations; the frozen weights get none, the adapter's are small), attention scores
and the vocabulary projection left out. Beside a machine's measured GEMM rate
(`machine.float32_gemm_gflops`, which `bench sync` prints) it says how far the trainer is
from its roofline. And `activation_bytes`: what the process's resident memory grew by over
the update's largest forward pass (the activations kept for backward, the logits among them),
the share of the step's memory that micro-batching (`optim.grad_accum`) bounds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lorasync.machine import rss_bytes

# generation (or the wait for a batch), reward and old-logprob scoring, the update's forward
# and backward passes (the KL's reference pass is in forward), the optimizer, the sync, and
# the health checks (the logprob difference and the weight-level check)
PHASES = ("generation", "score", "forward", "backward", "optimizer", "sync", "health")


def body_parameters(model: torch.nn.Module) -> int:
    """The parameters a token's forward pass multiplies by: all but the input embeddings and
    the output head (a row lookup, and a projection taken at few positions)."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


class StepProfile:
    """The phases and token counts of one step (`reset` starts the next)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.body = body_parameters(model)
        self.reset()
        model.get_input_embeddings().register_forward_pre_hook(self._count)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.tokens = {"grad": 0, "no_grad": 0}
        self.activation_bytes = 0
        self._active: str | None = None

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if self._active in ("score", "forward"):  # the passes whose time the rate divides by
            self.tokens["grad" if torch.is_grad_enabled() else "no_grad"] += args[0].numel()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}: one of {', '.join(PHASES)}")
        start, outer, self._active = time.perf_counter(), self._active, name
        resident = rss_bytes() if name == "forward" else None
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self._active = outer
            if resident is not None:
                self.activation_bytes = max(self.activation_bytes, (rss_bytes() or 0) - resident)

    def add(self, name: str, seconds: float) -> None:
        """A phase timed elsewhere (generation, in the producer's thread when async)."""
        self.seconds[name] += seconds

    def metrics(self) -> dict[str, float]:
        flops = 2 * self.body * (self.tokens["no_grad"] + 2 * self.tokens["grad"])
        passes = self.seconds["score"] + self.seconds["forward"] + self.seconds["backward"]
        return {
            **{f"seconds_{name}": seconds for name, seconds in self.seconds.items()},
            "trainer_tokens": self.tokens["grad"] + self.tokens["no_grad"],
            "trainer_gflops": flops / passes / 1e9 if passes > 0 else 0.0,
            "activation_bytes": self.activation_bytes,
        }
