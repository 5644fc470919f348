"""`vllm_compat.linear_weights_repacked`: the CPU condition that decides whether TRL's own sync
can load into vLLM, i.e. whether vLLM replaced the linear layers' weights (and their
`weight_loader`) with prepacked kernels. It depends on the CPU (oneDNN handles, AMX, zentorch),
so both sides are pinned here without an engine; tests/integrations/test_trl.py checks the live
engine's side."""

import torch
from vllm.model_executor.layers.linear import LinearBase, ReplicatedLinear

from lorasync.engines.vllm_compat import linear_weights_repacked


def linear(keeps_loader: bool) -> LinearBase:
    """A vLLM linear layer as the CPU backend leaves it (built without vLLM's parallel state)."""
    layer = ReplicatedLinear.__new__(ReplicatedLinear)
    torch.nn.Module.__init__(layer)
    if keeps_loader:  # no prepacked kernel could take it: the loaded weight, loader and all
        layer.weight = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        layer.weight.weight_loader = lambda param, loaded: param.data.copy_(loaded)
    else:  # prepacked: an empty Parameter without a loader (dispatch_cpu_unquantized_gemm)
        layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    return layer


def test_repacked_linears_are_detected_and_kept_ones_are_not():
    kept = torch.nn.Sequential(linear(True), torch.nn.Linear(2, 2), linear(True))
    assert not linear_weights_repacked(kept)  # plain torch layers are not vLLM's: ignored
    assert linear_weights_repacked(torch.nn.Sequential(linear(True), linear(False)))
