"""The low-precision verdict: judged against the implementations' own disagreement (the floor),
it passes a right sync on a real model in bf16, where a fixed tolerance fails it, and still
catches a skipped and a corrupted sync."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasync.sync.policy import AdapterSpec, attach_random_adapter, randomize_trainable
from lorasync.sync.verify import TOLERANCES, Verification, judge, measure_floor, probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import Tap

TOL = TOLERANCES["bfloat16"]


def test_without_a_floor_the_tolerance_decides():
    assert judge(Verification(0.09, 0.01, 10), TOL).ok
    assert not judge(Verification(0.11, 0.01, 10), TOL).ok


def test_with_a_floor_max_and_mean_are_judged_against_it():
    floor = Verification(0.4, 0.08, 10)
    right = judge(Verification(0.45, 0.09, 10), TOL, floor)
    assert right.ok and right.max_bound == pytest.approx(0.6) and right.mean_bound == pytest.approx(0.13)
    assert not judge(Verification(0.7, 0.09, 10), TOL, floor).ok  # one token far off
    assert not judge(Verification(0.5, 0.2, 10), TOL, floor).ok  # every token a little off
    # a floor below the tolerance never makes the verdict stricter than the tolerance on max
    assert judge(Verification(0.09, 0.001, 10), TOL, Verification(0.01, 0.0005, 10)).max_bound == TOL


@pytest.fixture(scope="module")
def bf16_engine(smollm2):
    """A fresh bf16 engine on the real model (it must serve the checkpoint for the floor)."""
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig

    engine = ColocatedEngine(EngineConfig(model=smollm2, dtype="bfloat16", max_model_len=512))
    yield engine
    engine.close()


@pytest.mark.real_model
def test_bf16_verdict_on_the_real_model(smollm2, bf16_engine):
    engine = bf16_engine
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    trainer = attach_random_adapter(base, AdapterSpec(rank=16, init_std=0.01))
    probes = probe_sequences(engine.vocab_size)
    floor = measure_floor(trainer, engine, probes)
    assert floor.max_abs_diff > TOL  # the problem: identical weights already exceed the tolerance

    sync = WeightSync(trainer, engine)
    sync()
    right = verify(trainer, engine, probes)
    assert judge(right, TOL, floor).ok, (right, floor)
    assert not judge(right, TOL).ok  # the fixed tolerance alone calls a right sync a mismatch

    randomize_trainable(trainer, seed=2, std=0.01)  # an optimizer step the engine never hears of
    skipped = verify(trainer, engine, probes)
    assert not judge(skipped, TOL, floor).ok, (skipped, floor)

    target = "model.layers.1.mlp.down_proj.weight"  # one tensor corrupted on its way

    def corrupt(weights):
        return ((name, t * 1.5 if name == target else t) for name, t in weights)

    WeightSync(trainer, Tap(engine, corrupt))()
    corrupted = verify(trainer, engine, probes)
    assert not judge(corrupted, TOL, floor).ok, (corrupted, floor)
    sync()
    assert judge(verify(trainer, engine, probes), TOL, floor).ok
