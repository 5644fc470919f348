"""`MergedWeight`: a tensor whose value is W + scale * L @ R, merged straight into whatever it is
copied into.

A weight sync hands each merged weight to a receiver that copies it into a parameter of its own
(vLLM's weight loaders narrow the tensor to their shard, then `copy_` it). Merged into a
temporary first, the merged tensor would be written once more and read once more than needed;
a `MergedWeight` makes that copy one merge kernel (`merge_kernel.py`: a fused `addmm`, or a
blocked float32 product added and cast in one pass) written into the receiver's parameter. Both
sides of a sync use it: the trainer (`merge.py`) and the server that merges received factors
(`receiver.py`).

Copying, narrowing and transposing are answered lazily (they are what weight loaders do), and
metadata is W's. Any other operation gets the plain merged value, so it keeps its usual meaning;
in-place operations on a `MergedWeight` are refused (they would write into a temporary). It has
no storage of its own, so nothing can read it as unmerged memory.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from lorasync.sync.merge_kernel import Kernel, merge_into

# What a MergedWeight answers from its own metadata (W's), without computing its value.
METADATA = frozenset({
    "shape", "dtype", "device", "is_meta", "is_cuda", "ndim", "layout", "requires_grad",
    "size", "dim", "numel", "element_size", "nbytes", "itemsize", "is_floating_point",
})


class MergedWeight(torch.Tensor):
    """W + scale * left @ right in W's dtype, on W's device, computed by `kernel` (the factors
    may be in any floating dtype: the kernel casts them as it needs)."""

    @staticmethod
    def __new__(cls, weight, left, right, scale, kernel=Kernel.ADDMM):
        return torch.Tensor._make_wrapper_subclass(
            cls, weight.shape, dtype=weight.dtype, device=weight.device
        )

    def __init__(
        self,
        weight: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        scale: float,
        kernel: Kernel = Kernel.ADDMM,
    ):
        self.weight, self.left, self.right, self.scale, self.kernel = weight, left, right, scale, kernel

    def __repr__(self) -> str:
        return (
            f"MergedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, scale={self.scale}, "
            f"kernel={self.kernel.value})"
        )

    def materialize(self) -> torch.Tensor:
        """The merged value as a plain tensor."""
        dest = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return merge_into(dest, self.weight, self.left, self.right, self.scale, self.kernel)

    def _copy_into(self, dest: torch.Tensor) -> torch.Tensor:
        if dest.is_meta:
            # vLLM's layerwise reload counts what its loaders copy by running them on meta tensors
            return dest.copy_(self.weight)
        if (dest.shape, dest.dtype, dest.device) == (self.shape, self.dtype, self.device):
            return merge_into(dest, self.weight, self.left, self.right, self.scale, self.kernel)
        return dest.copy_(self.materialize())

    def _narrow(self, dim: int, start: int, length: int) -> MergedWeight:
        dim = dim % 2
        if (start, length) == (0, self.shape[dim]):
            return self  # vLLM narrows each weight to its tensor-parallel shard: all of it here
        # rows of W are rows of `left`, columns of W are columns of `right`
        left = self.left.narrow(0, start, length) if dim == 0 else self.left
        right = self.right.narrow(1, start, length) if dim == 1 else self.right
        return MergedWeight(self.weight.narrow(dim, start, length), left, right, self.scale, self.kernel)

    def _transposed(self) -> MergedWeight:
        # (W + s L R)^T = W^T + s R^T L^T (GPT-2's Conv1D weights are loaded transposed)
        return MergedWeight(self.weight.t(), self.right.t(), self.left.t(), self.scale, self.kernel)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Answered here, before autograd and dispatch see a tensor without storage.
        kwargs = kwargs or {}
        name = func.__self__.__name__ if func.__name__ == "__get__" else func.__name__
        mine = bool(args) and isinstance(args[0], cls)
        if name == "copy_" and not mine and not kwargs and isinstance(args[1], cls):
            return args[1]._copy_into(args[0])
        if name == "narrow" and mine and not kwargs:
            return args[0]._narrow(*args[1:])
        if name == "t" and mine:
            return args[0]._transposed()
        if name in METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if mine and (name.endswith("_") and not name.startswith("__") or name == "__setitem__"):
            raise TypeError(f"a MergedWeight is read-only: {name} would write into a temporary")
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, cls) else a, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only past `__torch_function__` (with it disabled): the value, as above.
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, cls) else a, (args, kwargs or {}))
        return func(*args, **kwargs)
