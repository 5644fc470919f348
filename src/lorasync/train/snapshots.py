"""The policies of the last few weight versions, for the health check of stale batches.

In asynchronous mode a batch may have been sampled by a policy up to `max_staleness` versions
older than the trainer's (token by token, when a sync lands during generation). The health
check compares the engine's sampling logprobs with the trainer's logprobs of *that* policy, so the trainer keeps a copy of its trainable parameters
(the LoRA factors: a few MB) for each engine weight version still in the window, and scores
with it swapped in. Nothing is kept in synchronous mode.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lorasync.train.rollout import health_metrics


class PolicySnapshots:
    """Trainable parameters of `model` by engine weight version, the last `keep` versions."""

    def __init__(self, model: torch.nn.Module, keep: int) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.keep = keep
        self._by_version: OrderedDict[int, list[torch.Tensor]] = OrderedDict()

    def record(self, version: int) -> None:
        """The policy the engine serves as `version` is the trainer's now."""
        if self.keep == 0:
            return
        self._by_version[version] = [p.detach().clone() for p in self.params]
        while len(self._by_version) > self.keep:
            self._by_version.popitem(last=False)

    def health(
        self, score: Callable[[], torch.Tensor], engine_logprobs: torch.Tensor, versions: torch.Tensor,
        mask: torch.Tensor,
    ) -> dict[str, float]:
        """The health check of tokens sampled by older policies, each token against the policy
        of its own version: `score()` gives the model's logprobs (B, T) of the batch's tokens,
        and runs once per version present, with that version's policy swapped in. A batch
        sampled across a sync (`rollout.in_flight: keep`) has two versions in one completion."""
        diffs = []
        for version in sorted(set(versions[mask].tolist())):
            with self.policy_of(version), torch.no_grad():
                logprobs = score()
            width = logprobs.shape[1]
            ours = mask[:, :width] & (versions[:, :width] == version)
            diffs.append((logprobs - engine_logprobs[:, :width]).abs()[ours])
        return health_metrics(torch.cat(diffs))

    @contextmanager
    def policy_of(self, version: int) -> Iterator[None]:
        """The model holds the policy of `version` inside the block, its own after."""
        if version not in self._by_version:
            raise KeyError(
                f"no snapshot of weight version {version} (kept: {list(self._by_version)}): "
                "a batch older than rollout.max_staleness, or a sync the trainer did not record"
            )
        own = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, saved in zip(self.params, self._by_version[version]):
                    p.copy_(saved)
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, own):
                    p.copy_(saved)
