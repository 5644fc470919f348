"""vLLM worker extension: the receiving side of a sync, loaded by vLLM via `worker_extension_cls`.

vLLM mixes this class into its worker; the engine wrapper calls its methods by name through
`LLM.collective_rpc`, so no closures are pickled. This file must not import lorasync's trainer
side: it runs inside vLLM's worker and knows nothing of training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class LoraSyncWorkerExtension:
    """Methods vLLM's worker gains; `self` is the vLLM worker."""

    def lorasync_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format tensors in place and return how many were loaded.

        `model_runner.reload_weights` restores the loadable layout first; calling
        `model.load_weights` on the live model instead crashes on the CPU backend, whose
        linear layers are re-laid out after the initial load.
        """
        count = 0

        def counted() -> Iterable[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in weights:
                count += 1
                yield item

        self.model_runner.reload_weights(weights_iterator=counted())
        return count
