"""The GRPO trainer on real vLLM: the demo learns, the sync health check holds (and catches a
broken sync), resume continues exactly, and a saved adapter serves from a vLLM OpenAI server."""

import json

import pytest
import torch

from lorasync.recipes.demo import run_tiny_demo
from lorasync.train.trainer import GRPOTrainer
from tests.helpers import Tap, demo_trainer_config, run_lorasync

pytestmark = pytest.mark.vllm


def config_for(base, out, dropout=0.0, **optim):
    steps, save_every = optim.pop("steps", 4), optim.pop("save_every", 0)
    return demo_trainer_config(base, out, steps, save_every=save_every, lora={"dropout": dropout}, optim=optim)


def test_demo_reward_rises_and_the_sync_stays_exact(tmp_path, demo_base):
    (tmp_path / "base").symlink_to(demo_base)  # reuse the session's pre-trained base
    summary = run_tiny_demo(tmp_path, steps=60, seed=0, progress=False)
    assert summary["reward_last10"] > summary["reward_first10"] + 0.2, summary
    assert summary["logprob_diff_max"] <= 1e-4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("reward_mean", "sync_seconds", "logprob_diff_max", "loss", "kl", "clip_fraction",
                "tokens_per_second", "sync_bytes", "reward/digit_fraction_mean"):
        assert key in rows[0], key
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(summary["samples"]) == 4


def test_broken_sync_shows_in_the_health_metric(tmp_path, demo_base, engine_for):
    engine = engine_for(str(demo_base))
    calls = []

    def skip_after_first(weights):  # the first (full) sync goes through, then nothing does
        calls.append(1)
        return weights if len(calls) == 1 else iter(())

    trainer = GRPOTrainer(config_for(demo_base, tmp_path, steps=4, lr=1e-2), Tap(engine, skip_after_first))
    rows = trainer.train(progress=False)
    assert rows[0]["logprob_diff_max"] <= 1e-4  # step 1 samples from the synced start
    assert max(r["logprob_diff_max"] for r in rows[1:]) > 1e-4


def test_a_sync_skipped_at_step_5_warns_at_step_5_and_no_other(tmp_path, demo_base, engine_for, capsys):
    """The weight level reads a rotating slice after every sync: a sync that sent nothing is
    seen at its own step, before any batch is sampled from the stale engine."""
    from lorasync.sync.base import SyncReport
    from lorasync.train.health import health_warning

    engine = engine_for(str(demo_base))
    trainer = GRPOTrainer(config_for(demo_base, tmp_path, steps=6, lr=1e-2), engine)
    send = trainer.generation.sync.send

    def skip_step_5(strategy):
        if trainer.step == 4:  # step 5's sync (the step is counted after it)
            return SyncReport(strategy.value, 0, 0, 0.0, engine.weight_version)
        return send(strategy)

    trainer.generation.sync.send = skip_step_5
    rows = trainer.train(progress=False)
    warned = [r["step"] for r in rows if health_warning(r, trainer.tolerance, trainer.floor.value)]
    assert warned[0] == 5, warned
    assert rows[4]["weight_check_mismatches"] > 0 and rows[3]["weight_check_mismatches"] == 0
    out = capsys.readouterr()
    assert "warning: step 5:" in out.out + out.err


def test_a_nan_gradient_skips_its_update_and_nothing_non_finite_travels(tmp_path, demo_base, engine_for, monkeypatch):
    from safetensors.torch import load_file

    engine = engine_for(str(demo_base))
    trainer = GRPOTrainer(config_for(demo_base, tmp_path, steps=4, lr=1e-2), engine)
    clip = torch.nn.utils.clip_grad_norm_

    def poisoned(params, max_norm, *args, **kwargs):
        params = list(params)
        if trainer.step == 2:  # step 3's update
            params[0].grad.view(-1)[0] = float("nan")
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    rows = trainer.train(progress=False)
    assert [r["skipped_updates"] for r in rows] == [0, 0, 1, 0]
    assert [r["optimizer_steps"] for r in rows] == [1, 1, 0, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(r["logprob_diff_max"] < 1e-3 for r in rows)  # the engine served finite weights
    saved = load_file(trainer.save_checkpoint() / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_async_health_scores_each_batch_with_the_policy_that_sampled_it(tmp_path, demo_base, engine_for):
    """K = 1: batches one version old, scored by the kept snapshot of that version, agree with
    the engine to float32 precision; a broken sync (weights no longer loaded, versions still
    counted) shows all the same."""
    engine = engine_for(str(demo_base))
    config = config_for(demo_base, tmp_path / "ok", steps=4, lr=1e-2)
    config.rollout.mode, config.rollout.max_staleness = "async", 1
    rows = GRPOTrainer(config, engine).train(progress=False)
    assert [r["staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert max(r["logprob_diff_max"] for r in rows) <= 1e-4

    calls = []

    def skip_after_first(weights):
        calls.append(1)
        return weights if len(calls) == 1 else iter(())

    config = config_for(demo_base, tmp_path / "broken", steps=4, lr=1e-2)
    config.rollout.mode, config.rollout.max_staleness = "async", 1
    rows = GRPOTrainer(config, Tap(engine, skip_after_first)).train(progress=False)
    assert max(r["logprob_diff_max"] for r in rows[2:]) > 1e-4


def test_resume_continues_exactly(tmp_path, demo_base, engine_for):
    engine = engine_for(str(demo_base))
    # a schedule that moves, dropout that draws random numbers, the KL and accumulation paths
    opts = dict(beta=0.05, grad_accum=2, schedule="linear", dropout=0.1)
    straight = GRPOTrainer(config_for(demo_base, tmp_path / "a", steps=4, **opts), engine)
    straight.train(progress=False)

    # the same run, stopped by a failure in step 3, after the checkpoint of step 2
    crashed = GRPOTrainer(config_for(demo_base, tmp_path / "b", steps=4, save_every=2, **opts), engine)
    step = crashed.train_step
    crashed.train_step = lambda producer=None: (
        step(producer) if crashed.step < 2 else (_ for _ in ()).throw(RuntimeError("crash"))
    )
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train(progress=False)
    torch.manual_seed(1234)  # whatever ran in between: the checkpoint restores the RNGs
    resumed = GRPOTrainer(config_for(demo_base, tmp_path / "b", steps=4, save_every=2, **opts), engine)
    resumed.train(resume=True, progress=False)

    assert resumed.step == straight.step == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    sa, sb = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for key in sa["state"]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][key][field], sb["state"][key][field]), (key, field)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    same = ("reward_mean", "loss", "kl", "grad_norm", "lr", "logprob_diff_max")
    assert [{k: r[k] for k in same} for r in rows_a] == [{k: r[k] for k in same} for r in rows_b]
    assert all(r["kl"] >= 0 for r in rows_b) and rows_b[-1]["kl"] > 0


def test_train_command_with_yaml_and_overrides(tmp_path, demo_base):
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "digits.yaml"
    r = run_lorasync(
        "train", "--config", str(config), f"model.base={demo_base}", "optim.steps=2",
        f"output_dir={tmp_path}", f"data.path={config.parent / 'digits_prompts.jsonl'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 2 steps" in r.stdout
    assert (tmp_path / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json").is_file()
    bad = run_lorasync("train", "--config", str(config), "optim.lr=-1")
    assert bad.returncode == 2 and "optim.lr = -1.0: must be > 0" in bad.stderr
