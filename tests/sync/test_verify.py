"""The logprob verdict, judged against the implementations' own disagreement (the floor) in
every dtype: it passes a right sync on a real model, where a fixed tolerance fails it, passes a
zero adapter by construction, and still catches a skipped and a corrupted sync. Beside it the
weight level (sync/weight_check.py) names the corrupted tensor."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasync.sync.policy import AdapterSpec, attach_random_adapter, randomize_trainable
from lorasync.sync.verify import (
    MEAN_FACTOR, QUANTILE_FACTOR, TOLERANCES, Verification, judge, measure_floor, verdict_probes, verify,
)
from lorasync.sync.weight_check import check_weights
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import Tap

TOL = TOLERANCES["bfloat16"]


def test_without_a_floor_the_tolerance_decides():
    assert judge(Verification(0.09, 0.01, 10, 0.05), TOL).ok
    assert not judge(Verification(0.11, 0.01, 10, 0.05), TOL).ok


def test_with_a_floor_the_mean_and_the_quantile_are_judged_against_it():
    floor = Verification(0.4, 0.08, 10, 0.3)
    right = judge(Verification(0.9, 0.09, 10, 0.4), TOL, floor)  # one extreme token: not judged
    assert right.ok and right.max_bound is None
    assert right.mean_bound == pytest.approx(MEAN_FACTOR * 0.08 + TOL / 10)
    assert right.quantile_bound == pytest.approx(QUANTILE_FACTOR * 0.3 + TOL / 10)
    assert not judge(Verification(0.7, 0.2, 10, 0.4), TOL, floor).ok  # every token a little off
    assert not judge(Verification(1.2, 0.09, 10, 1.0), TOL, floor).ok  # many tokens far off


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0])
def test_a_check_that_measures_the_floor_passes_by_construction(scale):
    """A zero adapter on any model measures the floor itself, whatever its size: a deeper model
    with a larger vocabulary only raises the floor."""
    gen = torch.Generator().manual_seed(0)
    floor = Verification.of(torch.randn(500, generator=gen) * scale)
    assert judge(floor, TOLERANCES["float32"], floor).ok


def test_statistics_of_per_token_differences():
    check = Verification.of(torch.tensor([[0.1, -0.2], [0.3, 0.0]]))
    assert (check.max_abs_diff, check.tokens) == (pytest.approx(0.3), 4)
    assert check.mean_abs_diff == pytest.approx(0.15)
    assert 0.2 < check.quantile_abs_diff <= 0.3
    both = check.worst(Verification(0.1, 0.5, 3, 0.1))
    assert (both.max_abs_diff, both.mean_abs_diff, both.tokens) == (pytest.approx(0.3), 0.5, 7)
    with pytest.raises(ValueError, match="no tokens"):
        Verification.of(torch.tensor([]))


def test_verdict_probes_are_several_fixed_sets_and_the_task():
    probes = verdict_probes(500, extra=[[5, 6, 7]])
    assert len(probes) == 17 and probes[-1] == [5, 6, 7]
    assert probes == verdict_probes(500, extra=[[5, 6, 7]])
    assert probes[0] != probes[4]  # the sets differ


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def real_engine(request, smollm2):
    """A fresh engine on the real model (it must serve the checkpoint for the floor)."""
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig

    engine = ColocatedEngine(EngineConfig(model=smollm2, dtype=request.param, max_model_len=512))
    yield engine
    engine.close()


@pytest.mark.real_model
def test_both_levels_on_the_real_model(smollm2, real_engine):
    engine = real_engine
    dtype = engine.dtype
    TOL = TOLERANCES[str(dtype).removeprefix("torch.")]
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=dtype)
    trainer = attach_random_adapter(base, AdapterSpec(rank=16, init_std=0.01))
    probes = verdict_probes(engine.vocab_size)
    floor = measure_floor(trainer, engine, probes)
    if dtype == torch.bfloat16:  # the problem: identical weights already exceed the tolerance
        assert floor.max_abs_diff > TOL

    sync = WeightSync(trainer, engine)
    sync()
    right = verify(trainer, engine, probes)
    assert judge(right, TOL, floor).ok, (right, floor)
    if dtype == torch.bfloat16:
        assert not judge(right, TOL).ok  # the fixed tolerance alone calls a right sync a mismatch
    assert check_weights(sync).ok

    randomize_trainable(trainer, seed=2, std=0.01)  # an optimizer step the engine never hears of
    skipped = verify(trainer, engine, probes)
    assert not judge(skipped, TOL, floor).ok, (skipped, floor)

    target = "model.layers.1.mlp.down_proj.weight"  # one tensor corrupted on its way

    def corrupt(weights):
        return ((name, t * 1.5 if name == target else t) for name, t in weights)

    WeightSync(trainer, Tap(engine, corrupt))()
    corrupted = verify(trainer, engine, probes)
    assert not judge(corrupted, TOL, floor).ok, (corrupted, floor)
    weights = check_weights(sync)
    assert (weights.mismatches, weights.first_mismatch) == (1, target), weights
    sync()
    assert judge(verify(trainer, engine, probes), TOL, floor).ok
    assert check_weights(sync).ok
