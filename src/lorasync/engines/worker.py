"""The receiving side of a sync inside a vLLM worker: functions run by `collective_rpc`.

vLLM's `LLM.collective_rpc(fn, args=...)` calls `fn(worker, *args)` in each worker. lorasync's
engines keep vLLM's engine core in the trainer's process (colocated: `ColocatedEngine` and
TRL's colocate mode alike), so the call is direct: nothing is pickled, the weight generator
included. The server's receiver (`server/serve/receiver.py`) reloads through `reload_tensors` too.
This module knows nothing of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lorasync.engines import vllm_compat


def packed_modules(worker) -> dict[str, list[str]]:
    """The worker model's fused modules: {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}."""
    return vllm_compat.packed_modules(worker.model_runner.get_model())


def reload(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load checkpoint-format tensors into the worker's model in place; return how many."""
    return reload_tensors(
        lambda stream: vllm_compat.reload_in_place(worker, stream),
        worker.model_runner.get_model(),
        worker.model_config.hf_config.get_text_config().tie_word_embeddings,
        weights,
    )


def reload_tensors(
    reload: Callable[[Iterable[tuple[str, torch.Tensor]]], None],
    model: torch.nn.Module,
    tie_word_embeddings: bool,
    weights: Iterable[tuple[str, torch.Tensor]],
) -> int:
    """Stream checkpoint-format tensors through `reload` (an in-place reload of `model`),
    re-tie a tied lm_head, and return how many tensors were loaded."""
    loaded: set[str] = set()

    def recorded() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            loaded.add(name)
            yield name, tensor

    reload(recorded())
    if tie_word_embeddings:
        vllm_compat.retie_lm_head(model, loaded)
    return len(loaded)


def linear_weights_repacked(worker) -> bool:
    """`vllm_compat.linear_weights_repacked` for the worker's model."""
    return vllm_compat.linear_weights_repacked(worker.model_runner.get_model())


def read_back(worker, layout, visit: Callable[[str, torch.Tensor], None], only=None) -> None:
    """Call `visit(name, tensor)` for each tensor of the worker's model (with `only`, of those
    names), read back under its checkpoint name (`readback.read_back`): one tensor at a time."""
    from lorasync.engines.readback import read_back as tensors

    model = worker.model_runner.get_model()
    model_type = worker.model_config.hf_config.get_text_config().model_type
    for name, tensor in tensors(model, layout, vllm_compat.packed_modules(model), model_type, only):
        visit(name, tensor)
