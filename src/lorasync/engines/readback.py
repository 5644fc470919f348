"""What a vLLM model holds, read back under the checkpoint's tensor names.

The inverse of loading, for the weight-level verdict (`sync/weight_check.py`). Each tensor is
read as the engine computes with it, and named by these rules, in order:

1. a linear layer or LM head is read through its kernel (`vllm_compat.linear_weight`), every
   other parameter (embeddings, norms, biases) as it is;
2. a parameter whose name is a checkpoint tensor's is that tensor: as it is where the shapes
   agree, transposed where the checkpoint holds the transpose (GPT-2's Conv1D weights,
   `TRANSPOSED`); a tensor fused in the checkpoint itself (phi3's `qkv_proj`) is whole here;
3. a fused module (`packed_modules_mapping`: `qkv_proj` from q/k/v) is split along its rows
   into its parts, in the mapping's order, each part as many rows as the checkpoint's;
4. rows vLLM pads (a vocabulary padded to a multiple of 64) are cut to the checkpoint's;
5. a tied LM head, which the checkpoint does not hold, is read through the head's GEMM under
   `TIED_HEAD` + the input embedding's name: on CPU the head keeps a packed copy of the
   embedding for the logits, so the engine's two copies are checked against the same value.

What no rule names is not read; the verdict counts those tensors as unread
(`weight_check.WeightCheck.unread`), so it says how much it did not see. Nothing here knows of training or of the sync.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence

import torch

from lorasync.served_model import TIED_HEAD, Layout
from lorasync.engines import vllm_compat

# Checkpoint modules stored as (in, out), loaded transposed by vLLM (GPT-2's Conv1D).
TRANSPOSED = {"gpt2": frozenset({"c_attn", "c_proj", "c_fc"})}


def read_back(
    model: torch.nn.Module,
    layout: Layout,
    packed: Mapping[str, Sequence[str]],
    model_type: str,
    only: Collection[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every tensor of `model` the rules above name; with `only`,
    just the modules that hold one of those names (a module not wanted is never read, which
    spares its kernel's read-back)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    transposed = TRANSPOSED.get(model_type, frozenset())
    wanted = None if only is None else {name.rpartition(".")[0] for name in only}
    embedding = None
    for path, module in model.named_modules():
        kernel = isinstance(module, (LinearBase, ParallelLMHead))
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
            embedding = f"{path}.weight"
        head = isinstance(module, ParallelLMHead) and embedding is not None
        if wanted is not None and not _wanted(path, wanted, packed, embedding if head else None):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            tensor = vllm_compat.linear_weight(module) if kernel and leaf == "weight" else param.detach()
            name = f"{path}.{leaf}"
            if isinstance(module, ParallelLMHead) and name not in layout and embedding in layout:
                yield TIED_HEAD + embedding, tensor[: layout[embedding][0]]
                continue
            yield from _named(name, tensor, layout, packed, transposed)


def _wanted(path: str, wanted: set[str], packed, tied_to: str | None) -> bool:
    """Whether the vLLM module at `path` holds one of the wanted checkpoint modules (`wanted`:
    their paths; a head tied to the embedding `tied_to` is wanted with the embedding)."""
    parent, _, short = path.rpartition(".")
    candidates = {path, *(f"{parent}.{part}" for part in packed.get(short, ()))}
    if tied_to is not None:
        candidates.add(tied_to.rpartition(".")[0])
    return bool(candidates & wanted)


def _named(
    name: str,
    tensor: torch.Tensor,
    layout: Layout,
    packed: Mapping[str, Sequence[str]],
    transposed: frozenset[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rules 2-4 for one vLLM parameter."""
    module, _, leaf = name.rpartition(".")
    parent, _, short = module.rpartition(".")
    if name in layout:
        shape = layout[name]
        if short in transposed and tensor.dim() == 2:
            tensor = tensor.T
        yield name, _cut(tensor, shape)
        return
    parts = [f"{parent}.{part}.{leaf}" for part in packed.get(short, ())]
    if not parts or any(p not in layout for p in parts):
        return
    rows = [layout[p][0] for p in parts]
    if sum(rows) > tensor.shape[0]:
        return
    for part, piece in zip(parts, torch.split(tensor[: sum(rows)], rows)):
        yield part, piece


def _cut(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Rule 4: the checkpoint's rows of a padded tensor."""
    if tuple(tensor.shape) != tuple(shape) and tensor.dim() == len(shape) and tensor.shape[0] >= shape[0]:
        return tensor[: shape[0]]
    return tensor
