"""Checkpoints on disk (train/checkpoints.py): a save is whole or absent, whatever kills it and
wherever; a full disk leaves the earlier checkpoints intact and says so; a torn folder is
skipped, named (a torn last metrics line: test_metrics.py); loading unpickles no code. No vLLM:
the trainer's own objects, a tiny model."""

import random

import pytest
import torch
from transformers import get_scheduler

from lorasync.train import checkpoints
from lorasync.train.distributed import Dist
from tests.helpers import policy, train_step


class Killed(BaseException):
    """A kill -9 stand-in: no `except Exception` or `except OSError` runs for it."""


@pytest.fixture
def run(tiny_model):
    model = policy(tiny_model("llama"), targets=["q_proj", "v_proj"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_scheduler("constant", optimizer)

    def step_and_save(out, step):
        train_step(model)
        for p in model.parameters():  # an optimizer step, so that its state is not empty
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        optimizer.step()
        state = checkpoints.gather_state(model, optimizer, Dist())
        return checkpoints.save(out, step, model, scheduler, {"note": "test"}, state)

    return model, optimizer, scheduler, step_and_save


def snapshot(model, optimizer):
    return ({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()})


def same(a, b):
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_a_checkpoint_round_trips_without_unpickling_code(run, tmp_path):
    model, optimizer, scheduler, step_and_save = run
    path = step_and_save(tmp_path, 1)
    assert (path / checkpoints.COMPLETE).is_file() and checkpoints.latest(tmp_path) == path
    want = snapshot(model, optimizer)
    rng = (torch.get_rng_state(), random.getstate())
    train_step(model)
    torch.rand(3), random.random()
    assert checkpoints.load(path, model, optimizer, scheduler) == 1
    assert same(snapshot(model, optimizer), want)
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]


def test_a_kill_anywhere_inside_a_save_leaves_a_whole_checkpoint_to_resume(run, tmp_path, monkeypatch):
    """20 kill points over every file operation of a save, the rename and the swap of a step
    saved twice: the latest complete checkpoint always loads, and it is the old or the new
    state, never a mix."""
    model, optimizer, scheduler, step_and_save = run
    calls = {"n": 0, "kill_at": None}
    real = {"save": torch.save, "replace": checkpoints.os.replace, "fsync": checkpoints._fsync}

    def counted(name):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["kill_at"]:
                raise Killed(name)
            return real[name](*args, **kwargs)
        return call

    monkeypatch.setattr(checkpoints.torch, "save", counted("save"))
    monkeypatch.setattr(checkpoints.os, "replace", counted("replace"))
    monkeypatch.setattr(checkpoints, "_fsync", counted("fsync"))
    calls["kill_at"] = 10**9
    step_and_save(tmp_path / "probe", 2)
    operations = calls["n"]
    # 19 random points and the last operation of a save (the folder's fsync, after the rename)
    points = sorted({*random.Random(0).sample(range(1, operations), min(19, operations - 1)), operations})
    assert len(points) >= 10, operations
    outcomes = set()
    for kill_at in points:
        out = tmp_path / f"kill-{kill_at}"
        calls.update(n=0, kill_at=None)
        step_and_save(out, 1)
        old = snapshot(model, optimizer)
        calls.update(n=0, kill_at=kill_at)
        with pytest.raises(Killed):
            step_and_save(out, 2 if kill_at == operations or kill_at % 2 else 1)  # a second save of step 1 swaps folders
        new = snapshot(model, optimizer)  # what the killed save was writing
        calls["kill_at"] = None
        found = checkpoints.latest(out)
        assert found is not None and checkpoints.complete(found), kill_at
        checkpoints.load(found, model, optimizer, scheduler)
        state = snapshot(model, optimizer)
        assert same(state, old) or same(state, new), kill_at  # one or the other, never a mix
        outcomes.add("new" if same(state, new) else "old")
    assert outcomes == {"old", "new"}  # kills before and after the rename were both tried


def test_a_full_disk_keeps_the_earlier_checkpoint_and_says_how_to_go_on(run, tmp_path, monkeypatch):
    model, optimizer, scheduler, step_and_save = run
    first = step_and_save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(OSError, match=r"step 2 .*No space left.*intact \(the latest: .*step-000001\).*--resume"):
        step_and_save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert checkpoints.latest(tmp_path) == first


def test_a_torn_checkpoint_is_skipped_and_named(run, tmp_path, capsys):
    _, _, _, step_and_save = run
    good = step_and_save(tmp_path, 3)
    torn = checkpoints.folder(tmp_path, 4)  # what a crash mid-save left before markers existed
    (torn / "adapter").mkdir(parents=True)
    (torn / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoints.latest(tmp_path) == good
    assert "skipping the torn checkpoint" in capsys.readouterr().err
