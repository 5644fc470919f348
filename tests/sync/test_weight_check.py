"""The weight-level verdict: what an engine reads back against what the policy gives, bit for bit
where lorasync computed the bytes, within the merge's rounding where another kernel merged.

The fast tests read back from an in-memory engine (`MemoryReceiver`); the vLLM ones from real
engines, on whichever CPU path this machine takes (`tests/engines/test_readback.py` pins the
read-back itself)."""

import pytest
import torch

from lorasync.sync import weight_check
from lorasync.sync.weight_check import bound, check_weights, rotating_slice
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import MemoryReceiver, policy, train_step


class ReadableMemory(MemoryReceiver):
    """An in-memory engine that shows what it holds (`WeightReader`); `edit(name, fn)` changes
    one tensor behind the sync's back."""

    def read_back(self, visit, only=None):
        for name, tensor in self.served().items():
            if only is None or name in only:
                visit(name, tensor)

    def edit(self, name, change):
        self.tensors[name] = change(self.served()[name])


@pytest.fixture
def synced(tiny_model):
    def make(dtype="float32", strategy="streaming", **spec):
        model_dir = tiny_model("llama")
        trainer = policy(model_dir, dtype=dtype, **({"targets": ["all-linear"]} | spec))
        engine = ReadableMemory(model_dir, dtype)
        sync = WeightSync(trainer, engine, strategy)
        return trainer, engine, sync

    return make


def test_an_engine_as_built_holds_the_checkpoint(synced):
    _, engine, sync = synced()
    check = check_weights(sync)
    assert check.ok and check.exact and check.tensors == len(engine.checkpoint_layout()), check
    assert check.unread == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_streaming_sync_is_held_bit_for_bit_and_one_stale_tensor_is_named(synced, dtype):
    trainer, engine, sync = synced(dtype)
    sync()
    assert check_weights(sync).ok
    train_step(trainer)
    sync()
    assert check_weights(sync).ok
    stale = "model.layers.1.self_attn.q_proj.weight"
    engine.edit(stale, lambda t: t.clone().view(-1).index_add_(0, torch.tensor([0]), torch.ones(1, dtype=t.dtype)).view(t.shape))
    check = check_weights(sync)
    assert (check.ok, check.mismatches, check.first_mismatch) == (False, 1, stale), check
    assert check.first_mismatch_diff == pytest.approx(1.0, rel=0.01)
    assert stale in check.describe()


def test_one_ulp_off_is_a_mismatch_where_the_bytes_are_lorasyncs(synced):
    """Exact means exact: the smallest change a dtype can make is seen."""
    _, engine, sync = synced("bfloat16")
    sync()
    name = "model.layers.0.mlp.down_proj.weight"
    engine.edit(name, lambda t: torch.nextafter(t, torch.full_like(t, 10.0)))
    assert check_weights(sync).first_mismatch == name


def test_a_skipped_sync_is_seen(synced):
    trainer, _, sync = synced()
    sync()
    train_step(trainer)  # an optimizer step the engine never hears of
    check = check_weights(sync)
    assert not check.ok and check.mismatches >= 7, check  # every adapted linear of a layer at least


def test_merges_by_another_kernel_are_judged_within_their_rounding(synced, monkeypatch):
    """merge-unmerge is PEFT's merge, not lorasync's: in bf16 its bytes differ from the
    streaming merge's, by rounding only; a stale tensor still stands out."""
    trainer, _, sync = synced("bfloat16", "merge-unmerge")
    sync()
    check = check_weights(sync)
    assert check.ok and not check.exact, check
    train_step(trainer)  # the engine now holds the last step's merge: stale by a whole step
    assert not check_weights(sync).ok
    sync()
    # PEFT's bytes are not the streaming merge's: judged exactly, or without the bound's term
    # for the delta's rounding, a right merge-unmerge sync would be called a mismatch
    monkeypatch.setattr(weight_check, "FACTOR_ROUNDING", 0.0)
    assert not check_weights(sync).ok
    monkeypatch.setattr(weight_check, "EXACT", frozenset(weight_check.Strategy))
    assert not check_weights(sync).ok


def test_the_rounding_bound_grows_with_the_terms_not_with_their_sum():
    """A delta whose terms cancel is still rounded at the scale of its terms."""
    expected = torch.tensor([0.5, 0.0])
    terms = torch.tensor([0.0, 1.0])
    tol = bound(expected, terms, torch.bfloat16)
    assert tol[0] == pytest.approx(2 * 2**-7 * 0.5, rel=1e-3)  # two ulps of the value
    assert tol[1] == pytest.approx(weight_check.FACTOR_ROUNDING, rel=1e-3)
    assert bound(expected, None, torch.float32)[1] == torch.finfo(torch.float32).tiny


def test_an_adapter_sync_leaves_the_base_weights_as_they_were(synced):
    """With `adapter`, the engine's own weights must stay the checkpoint's, bit for bit."""
    _, engine, sync = synced()
    engine.weight_version = 1  # as if an adapter had been loaded
    sync.last_strategy = weight_check.Strategy.ADAPTER
    assert check_weights(sync).ok
    engine.edit("model.norm.weight", lambda t: t + 1)
    assert check_weights(sync).first_mismatch == "model.norm.weight"


def test_an_engine_that_cannot_read_back_gives_no_verdict(tiny_model):
    trainer = policy(tiny_model("llama"), targets=["all-linear"])
    sync = WeightSync(trainer, MemoryReceiver(tiny_model("llama")))
    assert check_weights(sync) is None


# --- real vLLM ----------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", ["streaming", "merge-unmerge"])
def test_real_engines_hold_what_was_synced(tiny_model, engine_for, dtype, strategy):
    model_dir = tiny_model("qwen2-tied")
    engine = engine_for(model_dir, dtype)
    trainer = policy(model_dir, dtype=dtype, targets=["all-linear"], modules_to_save=["embed_tokens"])
    sync = WeightSync(trainer, engine, strategy)
    sync()
    check = check_weights(sync)
    assert check.ok and check.unread == 0 and check.exact == (strategy == "streaming"), check
    # the tied head was read through its own GEMM too
    assert check.tensors == len(engine.checkpoint_layout()) + 1
    train_step(trainer)
    check = check_weights(sync)
    assert not check.ok, check  # stale by a step
    sync()
    assert check_weights(sync).ok


def test_rotating_slices_read_every_tensor_over_n_checks_and_each_sees_a_skipped_sync(synced):
    trainer, engine, sync = synced(targets=["q_proj", "v_proj"])
    sync()
    assert rotating_slice(sync, 0, 4) is None and rotating_slice(sync, 3, 1) is None
    slices = [rotating_slice(sync, k, 4) for k in range(1, 5)]
    assert set().union(*slices) == set(engine.checkpoint_layout())  # all, over 4 checks
    groups = [set(g) for g in engine.weight_groups()]
    for names in slices:  # whole fused groups, and never without a changed tensor
        assert all(g <= set(names) or not g & set(names) for g in groups)
        assert {e.checkpoint for e in sync.plan.changed} & set(names)
        assert len(names) < len(engine.checkpoint_layout()) / 2
    train_step(trainer)  # skipped
    for names in slices:
        check = check_weights(sync, names)
        assert not check.ok and check.tensors == len(names) and check.unread == 0, check


def test_a_stale_tensor_is_found_within_n_checks(synced):
    _, engine, sync = synced()
    sync()
    stale = "model.layers.0.mlp.up_proj.weight"
    engine.edit(stale, lambda t: t * 2)
    found = [k for k in range(1, 5) if not check_weights(sync, rotating_slice(sync, k, 4)).ok]
    assert len(found) == 1, found


def test_a_non_finite_policy_is_never_synced(synced):
    trainer, engine, sync = synced()
    sync()
    name, param = next((n, p) for n, p in trainer.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=f"refusing to sync: {name} holds 1 non-finite"):
        sync()
    assert engine.loads == 1 and check_weights(sync) is not None  # nothing more was sent
