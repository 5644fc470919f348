"""Verification catches a wrong sync; training continues after a sync; a failed load leaves
the trainer unmerged; the engine resets its prefix cache. On real vLLM (the refusals that
need no engine are in test_weight_sync.py and test_kinds.py)."""

import pytest
import torch

from lorasync.engines import worker
from lorasync.sync.merge import Merger
from lorasync.sync.verify import TOLERANCES, probe_sequences, trainer_scores, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import Tap, mixed_precision_policy, policy

pytestmark = pytest.mark.vllm
TOL = TOLERANCES["float32"]
# What a skipped or corrupted sync must show at least (docs/measurements.md: "sync skipped or
# one tensor corrupted: > 1e-2"): far above TOL, so a verification that under-reports fails here too.
CAUGHT = 1e-2


@pytest.fixture
def synced(tiny_model, engine_for):
    """A llama policy with a random all-linear adapter, synced into its engine."""
    model_dir = tiny_model("llama")
    engine = engine_for(model_dir)
    trainer = policy(model_dir, adapter_name="pol", seed=1)
    sync = WeightSync(trainer, engine)
    sync()
    return trainer, engine, sync


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_verification_catches_a_skipped_sync(synced):
    trainer, engine, sync = synced
    probes = probe_sequences(engine.vocab_size)
    assert verify(trainer, engine, probes).max_abs_diff <= TOL
    with torch.no_grad():  # an optimizer step the engine never hears of
        for name, param in trainer.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    assert verify(trainer, engine, probes).max_abs_diff > CAUGHT
    sync()
    assert verify(trainer, engine, probes).max_abs_diff <= TOL


def test_verification_catches_one_corrupted_tensor(synced):
    trainer, engine, sync = synced
    probes = probe_sequences(engine.vocab_size)
    target = "model.layers.1.mlp.down_proj.weight"

    def corrupt(weights):
        return ((name, t * 1.5 if name == target else t) for name, t in weights)

    WeightSync(trainer, Tap(engine, corrupt))()
    assert verify(trainer, engine, probes).max_abs_diff > CAUGHT
    sync()
    assert verify(trainer, engine, probes).max_abs_diff <= TOL


@pytest.mark.parametrize("strategy", ["streaming", "merge-unmerge"])
def test_training_continues_after_sync(tiny_model, engine_for, strategy):
    model_dir = tiny_model("llama")
    trainer = policy(model_dir, adapter_name="pol", seed=2)
    trainer.train()
    probes = probe_sequences(256, n=2, length=16)
    before = snapshot(trainer)
    trainable = {n for n, p in trainer.named_parameters() if p.requires_grad}
    outputs = trainer_scores(trainer, probes)

    WeightSync(trainer, engine_for(model_dir), strategy=strategy)()

    after = snapshot(trainer)
    assert trainable == {n for n, p in trainer.named_parameters() if p.requires_grad}
    assert trainer.training
    assert not any(getattr(m, "merged", False) for m in trainer.modules())
    for name in trainable:  # the trained factors are untouched, bit for bit
        assert torch.equal(before[name], after[name]), name
    if strategy == "streaming":  # never mutates the model
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert trainer_scores(trainer, probes) == outputs
    else:  # rewrites the frozen base in place: equal up to float32 rounding only
        assert max((before[n] - after[n]).abs().max().item() for n in before) < 1e-6
        torch.testing.assert_close(torch.tensor(trainer_scores(trainer, probes)), torch.tensor(outputs))
    loss = trainer(input_ids=torch.tensor(probes), labels=torch.tensor(probes)).loss
    loss.backward()
    assert all(trainer.get_parameter(n).grad is not None for n in trainable)


def test_unmerge_is_guaranteed_when_loading_fails(tiny_model, engine_for):
    model_dir = tiny_model("llama")
    engine = engine_for(model_dir)
    trainer = policy(model_dir, adapter_name="pol", seed=3)

    def broken(weights):
        yield next(iter(weights))
        raise RuntimeError("transport broke")

    with pytest.raises(RuntimeError, match="transport broke"):
        WeightSync(trainer, Tap(engine, broken), strategy="merge-unmerge")()
    assert not any(getattr(m, "merged", False) for m in trainer.modules())


def test_tensors_are_sent_in_the_engine_dtype(tiny_model, engine_for):
    """float32 LoRA factors over a bfloat16 base arrive in the engine's bfloat16, and real vLLM
    serves the policy (vLLM would convert another dtype silently: recorded on the way)."""
    model_dir = tiny_model("qwen2")
    engine = engine_for(model_dir, "bfloat16")
    trainer = mixed_precision_policy(model_dir)
    seen = set()

    def record(weights):
        for name, t in weights:
            seen.add(t.dtype)
            yield name, t

    report = WeightSync(trainer, Tap(engine, record))()
    assert seen == {torch.bfloat16}
    assert report.bytes_sent == 2 * sum(
        torch.Size(s).numel() for s in engine.checkpoint_layout().values()
    )
    result = verify(trainer, engine, probe_sequences(engine.vocab_size))
    assert result.max_abs_diff <= TOLERANCES["bfloat16"], result


def test_prefix_cache_would_serve_the_old_policy_without_the_reset(tiny_model, engine_for):
    """vLLM keeps cached prompt blocks across a weight load; the engine must reset them."""
    model_dir = tiny_model("qwen3")
    engine = engine_for(model_dir)
    old, new = policy(model_dir, seed=11), policy(model_dir, seed=12)
    WeightSync(old, engine)()
    prompt = probe_sequences(engine.vocab_size, n=1, length=400)[0]  # > one KV block (128 on CPU)

    def greedy():
        return engine.generate([prompt], max_tokens=4, temperature=0.0)[0][0]

    greedy()  # fills the prefix cache with the old policy's keys and values
    plan = WeightSync(new, engine).plan
    merger = Merger(new, plan.adapter_name)
    weights = [(e.checkpoint, merger(e)) for e in plan.full]
    engine.llm.collective_rpc(worker.reload, args=(iter(weights),))  # no reset
    stale = greedy()
    engine.load_weights(iter(weights))  # the engine's own load resets the cache
    fresh = greedy()

    expected = trainer_scores(new, [prompt + fresh.token_ids])[0][-len(fresh.token_ids):]
    assert max(abs(a - b) for a, b in zip(fresh.logprobs, expected)) <= TOL
    assert stale.token_ids != fresh.token_ids or max(
        abs(a - b) for a, b in zip(stale.logprobs, fresh.logprobs)
    ) > 1e-3


def test_two_engines_in_one_process_keep_their_own_rotary_caches(tiny_model, engine_for):
    """vLLM caches rotary-embedding modules process-wide; an in-place reload of one engine
    would leave another's cos/sin cache on the meta device (`vllm_compat.fresh_rope_cache`)."""
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig

    model_dir = tiny_model("llama")
    first = engine_for(model_dir)
    trainer = policy(model_dir, adapter_name="pol", seed=1)
    WeightSync(trainer, first)()
    probes = probe_sequences(first.vocab_size, n=2)
    before = first.score(probes)
    second = ColocatedEngine(EngineConfig(model=model_dir))  # the same rotary shape
    try:
        WeightSync(policy(model_dir, seed=2), second)()  # an in-place reload of the second
        after = first.score(probes)
    finally:
        second.close()
    assert after == before
