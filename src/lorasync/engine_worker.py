"""vLLM worker extension: the receiving side of a sync, loaded by vLLM via `worker_extension_cls`.

vLLM mixes this class into its worker; the engine wrapper calls its methods by name through
`LLM.collective_rpc`, so no closures are pickled. This file must not import lorasync's trainer
side: it runs inside vLLM's worker and knows nothing of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)


def _retie_lm_head(model: torch.nn.Module, loaded: set[str]) -> None:
    """Point a tied lm_head at the input embedding again, if the embedding was reloaded.

    vLLM 0.32's layerwise reload puts the lm_head's pre-reload tensor back when no
    `lm_head.weight` arrives ("ParallelLMHead: Failed to load weights"), which unties it: the
    model would embed with the new weights and project with the old ones. On CPU the head
    also keeps a packed copy of its weight for the logits GEMM, so it is re-processed too;
    that costs about 0.3 s for a 152k vocabulary, hence only when the embedding changed.
    """
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeds = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    ]
    if len(heads) == 1 and len(embeds) == 1 and f"{embeds[0][0]}.weight" in loaded:
        head = heads[0].tie_weights(embeds[0][1])
        head.quant_method.process_weights_after_loading(head)


class LoraSyncWorkerExtension:
    """Methods vLLM's worker gains; `self` is the vLLM worker."""

    def lorasync_packed_modules(self) -> dict[str, list[str]]:
        """The model's fused modules: {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}."""
        return dict(getattr(self.model_runner.get_model(), "packed_modules_mapping", {}))

    def lorasync_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format tensors in place and return how many were loaded.

        `model_runner.reload_weights` restores the loadable layout first; calling
        `model.load_weights` on the live model instead crashes on the CPU backend, whose
        linear layers are re-laid out after the initial load.
        """
        return reload_tensors(
            lambda stream: self.model_runner.reload_weights(weights_iterator=stream),
            self.model_runner.get_model(),
            self.model_config.hf_config.get_text_config().tie_word_embeddings,
            weights,
        )


def reload_tensors(
    reload: Callable[[Iterable[tuple[str, torch.Tensor]]], None],
    model: torch.nn.Module,
    tie_word_embeddings: bool,
    weights: Iterable[tuple[str, torch.Tensor]],
) -> int:
    """Stream checkpoint-format tensors through `reload` (an in-place reload of `model`),
    re-tie a tied lm_head, and return how many tensors were loaded.

    Shared by the worker extension (colocated engines) and the server receiver
    (`receiver.py`), which reload through different vLLM entry points.
    """
    loaded: set[str] = set()

    def recorded() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            loaded.add(name)
            yield name, tensor

    reload(recorded())
    if tie_word_embeddings:
        _retie_lm_head(model, loaded)
    return len(loaded)
