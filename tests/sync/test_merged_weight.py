"""A MergedWeight is its value, W + scale * L @ R, however a receiver reads it; copied into a
tensor it writes exactly that value there. No vLLM here: tests/sync/test_parity.py shows vLLM's
loaders take the in-place path."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorasync.sync.merge_kernel import Kernel
from lorasync.sync.merged_weight import MergedWeight


class CopiedElements(TorchDispatchMode):
    """Counts the elements `copy_` writes, as vLLM's layerwise reload does on meta tensors."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.numel += args[0].numel()
        return func(*args, **(kwargs or {}))


def weight_and_value(dtype, kernel=Kernel.ADDMM):
    """A MergedWeight (float32 factors) and its value as the kernel defines it: the product in
    W's dtype for addmm, in float32 rounded once for the blocked kernel."""
    weight = torch.randn(12, 8).to(dtype)
    left, right = torch.randn(12, 4), torch.randn(4, 8)
    if kernel is Kernel.ADDMM:
        value = torch.addmm(weight, left.to(dtype), right.to(dtype), alpha=0.5)
    else:
        value = torch.add(weight.float(), left @ right, alpha=0.5).to(dtype)
    return MergedWeight(weight, left, right, 0.5, kernel), value


@pytest.mark.parametrize("kernel", list(Kernel))
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_write_exactly_the_merged_value(dtype, mode, kernel):
    """Whole, into a row slice of a fused parameter or a column slice, column-narrowed,
    transposed, converted; with either kernel."""
    lazy, value = weight_and_value(dtype, kernel)
    with mode():
        fused = torch.zeros(20, 8, dtype=dtype)
        fused.narrow(0, 4, 6).copy_(lazy.narrow(0, 2, 6))
        assert torch.equal(fused[4:10], value[2:8]) and not fused[:4].any() and not fused[10:].any()
        wide = torch.zeros(12, 20, dtype=dtype)  # a destination that is not contiguous
        wide[:, 4:12].copy_(lazy)
        assert torch.equal(wide[:, 4:12], value) and not wide[:, :4].any() and not wide[:, 12:].any()
        # the blocked kernel's transposed product may sum in another order: float32 rounding
        close = {"rtol": 1e-6, "atol": 1e-6} if kernel is Kernel.BLOCKED else {"rtol": 0, "atol": 0}
        for read, expected in [(lazy.narrow(1, 5, 3), value[:, 5:]), (lazy.t(), value.t()), (lazy, value)]:
            torch.testing.assert_close(torch.empty_like(expected).copy_(read), expected, **close)
        assert torch.equal(torch.empty(12, 8, dtype=torch.float64).copy_(lazy), value.double())


@pytest.mark.parametrize("kernel", list(Kernel))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_other_read_gets_the_plain_value(dtype, kernel):
    lazy, value = weight_and_value(dtype, kernel)
    assert (lazy.shape, lazy.dtype, lazy.numel(), lazy.dim()) == (value.shape, dtype, 96, 2)
    reads = [
        (lazy + 0, value),
        (lazy.to(torch.float64), value.double()),
        (lazy.contiguous(), value),
        (lazy[1:3], value[1:3]),
        (lazy.view(96), value.view(96)),
        (torch.cat([lazy, lazy]), torch.cat([value, value])),
    ]
    for plain, expected in reads:
        assert type(plain) is torch.Tensor and torch.equal(plain, expected)


def test_copies_into_meta_tensors_count_their_elements():
    """vLLM's layerwise reload runs each loader on meta tensors to count what it loads."""
    lazy, _ = weight_and_value(torch.bfloat16)
    with CopiedElements() as copied:
        torch.empty(12, 8, dtype=torch.bfloat16, device="meta").narrow(0, 0, 6).copy_(lazy.narrow(0, 0, 6))
    assert copied.numel == 48


def test_writes_into_it_are_refused():
    """Its value is computed on each read: a write would land in a temporary and be lost."""
    lazy, value = weight_and_value(torch.float32)
    for write in (lambda: lazy.add_(1), lambda: lazy.copy_(value), lambda: lazy.__setitem__(0, 1.0)):
        with pytest.raises(TypeError, match="read-only"):
            write()
