"""Data-parallel GRPO (train/distributed.py): N ranks as processes (gloo on CPU), each with an
in-memory engine that replays fixed generations, so sampling never enters a comparison.

- DDP and FSDP2: 2 ranks with half the batch each end with the adapter of 1 rank with the
  whole batch after 3 steps (float32, within 1e-5), and report the same global metrics;
- a rank that dies makes the other fail with a clear error within the timeout.

The tests that spawn ranks (about 10-20 s each on 2 cores; no vLLM engine) are marked
`distributed`, outside the fast tier, each with a timeout; the pure functions (names,
shards, settings) are checked in the fast tier.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorasync.train import distributed
from lorasync.train.config import ConfigError, ParallelConfig, config_from_dict
from tests.helpers import ReplayEngine, demo_trainer_config, run_ranks

heavy = pytest.mark.distributed  # spawns ranks (processes; no vLLM engine): outside the fast tier


def test_wrapper_prefixes_are_stripped_from_names():
    """What the sync and checkpoints see (TRL #7131); checked to fail with the
    `_checkpoint_wrapped_module` alternative left out of the pattern."""
    assert distributed.clean_name("module.base_model.model.layers.0.q_proj.lora_A.default.weight") == (
        "base_model.model.layers.0.q_proj.lora_A.default.weight"
    )
    assert distributed.clean_name(
        "base_model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.lora_B.default.weight"
    ) == "base_model.layers.0.mlp.lora_B.default.weight"
    assert distributed.clean_name("model.modules_to_save.default.weight") == "model.modules_to_save.default.weight"


def test_each_rank_gets_whole_prompts_and_together_the_batch():
    """No GRPO group is split, and the shards are the global batch in order; checked to fail
    with a strided shard (rows[rank::world]: a different order than one rank's batch)."""
    rows = list(range(8))
    shards = [distributed.shard(rows, distributed.Dist(r, 4)) for r in range(4)]
    assert shards == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert distributed.shard(rows, distributed.Dist()) == rows


def test_settings_that_cannot_run_on_n_ranks_are_refused_with_the_fix():
    """Known only at start (the number of ranks): a batch that does not split into whole
    prompts per rank, and async mode but with DDP (and, against servers, each token's version
    from them); and the section's own rules. Checked to fail with the
    divisibility check of `distributed.check` removed."""
    raw = {"model": {"base": "m"}, "data": {"prompts": ["a"]}, "rewards": [{"function": "m:f"}],
           "rollout": {"prompts_per_step": 3}, "optim": {"grad_accum": 1}}
    config = config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step = 3: must be a multiple of the 2 ranks"):
        distributed.check(config, distributed.Dist(0, 2))
    distributed.check(config, distributed.Dist())  # one process: anything goes
    raw["rollout"] = {"prompts_per_step": 2, "mode": "async", "max_staleness": 1}
    distributed.check(config_from_dict(raw), distributed.Dist(0, 2))  # DDP, colocated engines
    with pytest.raises(ConfigError, match="rollout.mode = 'async' on 2 ranks runs with parallel.mode=ddp"):
        distributed.check(config_from_dict(raw | {"parallel": {"mode": "fsdp2"}}), distributed.Dist(0, 2))
    servers = raw | {"engine": {"kind": "server", "servers": ["http://h:1"]}}
    with pytest.raises(ConfigError, match="rollout.in_flight = 'wait': .* set rollout.in_flight=keep"):
        distributed.check(config_from_dict(servers), distributed.Dist(0, 2))
    servers["rollout"] = raw["rollout"] | {"in_flight": "keep"}
    distributed.check(config_from_dict(servers), distributed.Dist(0, 2))
    with pytest.raises(ConfigError, match="parallel.mode = 'zero3': use one of ddp, fsdp2"):
        config_from_dict(raw | {"parallel": {"mode": "zero3"}})
    with pytest.raises(ConfigError, match="parallel.timeout_seconds = 0.0: must be > 0"):
        config_from_dict(raw | {"parallel": {"timeout_seconds": 0}})


def replay_config(model_dir: str, out, steps: int = 3, mode: str = "ddp", grad_accum: int = 1,
                  rollout: str = "sync"):
    return demo_trainer_config(
        model_dir, out, steps, parallel={"mode": mode},
        # lr: larger steps amplify float32 rounding through Adam past 1e-5
        optim={"grad_accum": grad_accum, "lr": 2e-3},
        rollout={"mode": rollout, "max_staleness": int(rollout == "async")},
    )


def _train(rank: int, model_dir: str, out: str, mode: str, grad_accum: int, steps: int = 3,
           resume: bool = False, rollout: str = "sync") -> None:
    from lorasync.train.trainer import GRPOTrainer

    config = replay_config(model_dir, out, steps=steps, mode=mode, grad_accum=grad_accum, rollout=rollout)
    GRPOTrainer(config, ReplayEngine(model_dir)).train(resume=resume, progress=False)
    distributed.close(distributed.init(ParallelConfig()))


def final_adapter(out) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors")


@heavy
@pytest.mark.parametrize(("mode", "rollout"), [("ddp", "sync"), ("fsdp2", "sync"), ("ddp", "async")])
def test_two_ranks_with_half_the_batch_end_where_one_rank_with_all_of_it_does(tiny_model, tmp_path, mode, rollout):
    """The equivalence of the issue: the same fixed generations (`ReplayEngine`), 4 prompts a
    step on 1 rank (1 micro-batch) or 2 on each of 2 ranks (2 micro-batches each), 3 steps:
    the adapters agree within 1e-5 and rank 0 writes the global batch's metrics. The
    completions have different lengths, so the token mean over the global batch differs from
    a mean of the ranks' (or micro-batches') means. Checked to fail (DDP) with the gradient
    scaled by 1 / local tokens instead of ranks / global tokens (the adapters then differ by
    6e-4), and with `shard` giving every rank the first share (1e-2). Async (DDP): each rank's
    producer samples a step ahead from its own engine (max_staleness 1); the same holds, since
    the loss's importance weights come from the engine's sampling logprobs, whatever version
    sampled them."""
    model = tiny_model("qwen2")
    one = tmp_path / "one"
    _train(0, model, str(one), mode, 1, rollout=rollout)
    two = tmp_path / "two"
    assert run_ranks(_train, 2, model, str(two), mode, 2, 3, False, rollout, timeout=300) == [0, 0]

    a, b = final_adapter(one), final_adapter(two)
    assert a.keys() == b.keys() and len(a) > 0
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3  # B started at 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    rows = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (one, two)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    if rollout == "async":  # instant generation runs a step ahead, on every rank
        assert [r["staleness_max"] for r in rows[1]] == [0, 1, 1]
        assert [r["policy_versions"] for r in rows[1]] == [[0], [0], [1]]
    for r1, r2 in zip(*rows):
        assert r1["reward_mean"] == pytest.approx(r2["reward_mean"], abs=1e-6)
        assert r1["reward_std"] == pytest.approx(r2["reward_std"], abs=1e-6)
        assert r1["completion_tokens"] == r2["completion_tokens"]
        assert r1["logprob_diff_max"] == pytest.approx(r2["logprob_diff_max"], abs=1e-5)


@heavy
@pytest.mark.parametrize(("mode", "first", "then"), [("ddp", 2, 1), ("fsdp2", 2, 1), ("fsdp2", 1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks_where_the_run_would_have_gone(
    tiny_model, tmp_path, mode, first, then
):
    """2 steps on `first` ranks, then the run resumed from its checkpoint on `then` ranks for
    the third (the same fixed generations): the adapter ends where 3 uninterrupted steps on 1
    rank end, within 1e-5, so the adapter, the optimizer state (keyed by index in one process
    or DDP, by name under FSDP2: `checkpoints.keyed`), the schedule and the global batch all
    carried over. Checked to fail with the optimizer state left out of the resume (3.5e-3 in
    all three) and with `keyed` skipped (1 -> 2 under FSDP2: both ranks fail to load)."""
    model = tiny_model("qwen2")
    one = tmp_path / "one"
    _train(0, model, str(one), mode, grad_accum=1)
    out = tmp_path / "resumed"
    for world, steps, resume in [(first, 2, False), (then, 3, True)]:
        if world == 1:
            _train(0, model, str(out), mode, 1, steps, resume)
        else:
            assert run_ranks(_train, world, model, str(out), mode, 2, steps, resume, timeout=300) == [0, 0]
    a, b = final_adapter(one), final_adapter(out)
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, diff
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def _die(rank: int, model_dir: str, out: str, how: str) -> None:
    from lorasync.train.trainer import GRPOTrainer

    config = replay_config(model_dir, out, steps=3)
    config.parallel.timeout_seconds = 20
    trainer = GRPOTrainer(config, ReplayEngine(model_dir))
    error = Path(out) / "error.json"

    def stop() -> None:  # rank 1 in its second step: dies, or freezes until rank 0 gave up
        if how == "freezes":
            deadline = time.monotonic() + 120
            while not error.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
        os._exit(7)

    if rank == 1:
        step = trainer.train_step
        trainer.train_step = lambda producer=None: step(producer) if trainer.step < 1 else stop()
    start = time.monotonic()
    try:
        trainer.train(progress=False)
    except distributed.RankFailure as err:
        error.write_text(json.dumps({"message": str(err), "seconds": time.monotonic() - start}))
        os._exit(3)


@heavy
@pytest.mark.timing  # the failure must come within 15 s (dies) or 60 s (frozen): run alone
@pytest.mark.parametrize("how", ["dies", "freezes"])
def test_a_dead_or_frozen_rank_makes_the_others_fail_with_a_clear_error_in_bounded_time(tiny_model, tmp_path, how):
    """Rank 1 dies (or freezes) in its second step; rank 0, blocked in a collective, fails
    with `RankFailure` naming the cause and the setting: at once when the peer is dead (its
    connection closes), within `parallel.timeout_seconds = 20` when it is frozen (gloo's
    timeout). Checked to fail without the trainer's `failures` around a step (gloo's bare
    RuntimeError: exit code 1, not 3)."""
    codes = run_ranks(_die, 2, tiny_model("qwen2"), str(tmp_path), how, timeout=180)
    assert codes == [3, 7], codes
    error = json.loads((tmp_path / "error.json").read_text())
    assert "another rank died or did not answer" in error["message"]
    assert "parallel.timeout_seconds = 20" in error["message"]
    assert error["seconds"] < (15 if how == "dies" else 60), error


def test_a_process_group_made_by_someone_else_first_is_refused(tmp_path, monkeypatch):
    """A colocated vLLM engine built before the trainer creates a default process group of
    world size 1; a trainer that took it would train alone on each rank, silently. Checked to
    fail with the world-size comparison removed (init returns rank 0 of 1)."""
    import torch.distributed as dist

    # In the whole suite an engine built earlier in this process may have made one already:
    # that is the case itself; otherwise make one here.
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RuntimeError, match="torchrun started 2 ranks, but this process's default process group has 1"):
            distributed.init(ParallelConfig())
    finally:
        if created:
            dist.destroy_process_group()
