"""`lorasync bench rollout`: lorasync's trainer with sync and async rollouts, the same
run each way. Flags refused with the fix before anything is built; the modes' configs alike
but for the rollout mode; the server stopped on error; and, marked
vllm, the bench end to end on the tiny model (the JSON's structure and the numbers' relations,
not their values: a shared 2-core machine)."""

import json
from pathlib import Path

import pytest

from lorasync.commands.cli import main
from lorasync.bench.rollout import (
    RolloutBenchConfig, bench_engine, format_table, task_defaults, tiny_base, train_config,
)
from lorasync.bench.trl import TrlBenchConfig
from tests.helpers import run_lorasync

STEPS, K = 3, 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--modes", "sync,asink"],
         "--modes = 'sync,asink': 'asink' is not a rollout mode; use sync, async or both (sync,async)"),
        (["--modes", "sync,sync"], "--modes = 'sync,sync': name each mode once"),
        (["--max-staleness", "-1"], "--max-staleness = -1: a batch cannot come "
         "from a newer policy than the trained one: use >= 0"),
        (["--modes", "sync", "--max-staleness", "1"], "--max-staleness = 1: only async rollouts run ahead "
         "of the policy: add async (--modes sync,async) or drop --max-staleness"),
        (["--grad-accum", "3"], "--grad-accum = 3: must divide prompts-per-step x num-generations = 32"),
        (["--engine", "server", "--in-flight", "keep,hold"],
         "--in-flight = 'keep,hold': name each of wait, keep at most once (e.g. wait,keep)"),
        (["--in-flight", "keep"], "--in-flight = 'keep': keep lets syncs land in "
         "an async batch on a server: add async to --modes and --engine server, or drop it"),
        (["--modes", "sync", "--engine", "server", "--in-flight", "keep"], "--in-flight = 'keep': keep lets"),
    ],
)
def test_bad_flags_are_refused_naming_flag_value_and_fix(flags, message, capsys, tmp_path, monkeypatch):
    def runs(*args, **kwargs):
        raise AssertionError("the bench started: the flags were not refused")

    # exit status 2 and one line, before any model, engine or server is built
    monkeypatch.setattr("lorasync.bench.rollout.run_rollout_bench", runs)
    assert main(["bench", "rollout", "--model", "tiny", "--out", str(tmp_path / "out"), *flags]) == 2
    assert f"lorasync bench: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_staleness_defaults_to_1_with_async_and_0_without():
    assert RolloutBenchConfig(model="tiny").max_staleness == 1
    assert RolloutBenchConfig(model="tiny", modes=("sync",)).max_staleness == 0
    assert RolloutBenchConfig(model="tiny", modes=("async",), max_staleness=0).max_staleness == 0


def test_shape_defaults_are_the_tiny_demo_s_and_the_trl_bench_s(tmp_path):
    assert task_defaults(True) == dict(prompts_per_step=4, num_generations=8, max_tokens=12, lr=2e-3,
                                       rank=16, grad_accum=1)  # as --help says
    (tmp_path / "config.json").write_text("{}")
    trl = TrlBenchConfig(model=str(tmp_path))
    assert task_defaults(False) == {k: getattr(trl, k) for k in task_defaults(False)}


@pytest.mark.parametrize("engine", ["colocated", "server"])
def test_the_modes_train_the_same_run_but_for_the_rollout(engine, tmp_path):
    config = RolloutBenchConfig(model="tiny", engine=engine, steps=7, max_staleness=2, seed=3,
                                prompts_per_step=2, out=str(tmp_path))
    servers = ["http://127.0.0.1:9"] if engine == "server" else []
    runs = {mode: train_config(config, "base", mode, servers) for mode in ("sync", "async")}
    if engine == "server":
        runs["async-keep"] = train_config(config, "base", "async", servers, "keep")
        assert runs["async-keep"].rollout.in_flight == "keep"
        assert runs["async-keep"].output_dir == str(tmp_path / "async-keep")
    assert (runs["sync"].rollout.mode, runs["sync"].rollout.max_staleness) == ("sync", 0)
    assert (runs["async"].rollout.mode, runs["async"].rollout.max_staleness) == ("async", 2)
    assert runs["async"].output_dir == str(tmp_path / "async")
    for run in runs.values():
        run.rollout.mode, run.rollout.max_staleness, run.rollout.in_flight, run.output_dir = "sync", 0, "wait", ""
    assert all(run == runs["sync"] for run in runs.values())
    run = runs["sync"]
    assert (run.optim.steps, run.optim.seed, run.optim.lr, run.rollout.prompts_per_step) == (7, 3, 2e-3, 2)
    assert run.data.prompts and run.rewards[0].function == "lorasync.train.rewards:digit_fraction"
    assert (run.engine.kind, run.engine.servers, run.sync.strategy.value) == (
        ("server", servers, "factors") if engine == "server" else ("colocated", [], "streaming"))


def test_runs_are_sync_then_async_per_in_flight():
    config = RolloutBenchConfig(model="tiny", engine="server", in_flight=("wait", "keep"))
    assert config.runs() == [("sync", "sync", "wait"), ("async", "async", "wait"), ("async-keep", "async", "keep")]
    config = RolloutBenchConfig(model="tiny", modes=("async",), engine="server", in_flight=("keep",))
    assert config.runs() == [("async-keep", "async", "keep")]


def test_tiny_base_is_built_once_aside_then_reused(tmp_path, monkeypatch):
    pretrained = []
    monkeypatch.setattr("lorasync.recipes.demo.pretrain", lambda folder, seed: pretrained.append(Path(folder)))
    (tmp_path / "base.partial").mkdir()  # left by an interrupted build
    (tmp_path / "base.partial" / "junk").write_text("")
    base = tiny_base(tmp_path)
    assert base == tmp_path / "base" and (base / "model.safetensors").is_file()
    assert pretrained == [tmp_path / "base.partial"] and not (tmp_path / "base.partial").exists()
    assert not (base / "junk").exists()
    assert tiny_base(tmp_path) == base and len(pretrained) == 1


class FakeServer:
    def __init__(self) -> None:
        self.terminated = False

    def terminate(self) -> None:
        self.terminated = True

    def wait(self, timeout=None) -> int:
        return 0


def test_the_server_is_stopped_when_it_fails_to_start(monkeypatch, tmp_path):
    server = FakeServer()
    monkeypatch.setattr("lorasync.server.serve.launch.start_server", lambda *args, **kwargs: server)

    def never_healthy(url, process, timeout):
        raise TimeoutError(f"the server at {url} did not answer /health")

    monkeypatch.setattr("lorasync.server.serve.launch.wait_healthy", never_healthy)
    config = RolloutBenchConfig(model="tiny", engine="server", out=str(tmp_path))
    with pytest.raises(TimeoutError), bench_engine(config, "base"):
        pass
    assert server.terminated


@pytest.mark.vllm
def test_bench_runs_both_modes_on_the_tiny_model(tmp_path):
    r = run_lorasync(
        "bench", "rollout", "--model", "tiny", "--modes", "sync,async", "--max-staleness", str(K),
        "--steps", str(STEPS), "--out", str(tmp_path / "out"), "--json", cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # progress and the libraries' output must not reach stdout
    assert "building the tiny demo model into" in r.stderr  # the demo's, pre-trained (about 5 s)
    assert (tmp_path / "out" / "base" / "model.safetensors").is_file()
    assert result["machine"]["cpus"] >= 1 and result["machine"]["cpu_model"]
    assert result["config"]["modes"] == ["sync", "async"] and result["config"]["task"] == "digits"
    assert result["model_dir"] == str(tmp_path / "out" / "base") and result["warmup_seconds"] > 0
    modes = result["modes"]
    assert list(modes) == ["sync", "async"]
    for mode, side in modes.items():
        # what the trainer ran with, read back from the run folder
        assert side["rollout"] == {"mode": mode, "max_staleness": K if mode == "async" else 0, "in_flight": "wait"}
        assert side["sync_strategy"] == "streaming" and Path(side["run_dir"]) == tmp_path / "out" / mode
        assert side["steps"] == STEPS and [s["step"] for s in side["per_step"]] == [1, 2, 3]
        for s in side["per_step"]:
            assert 0 <= s["wait_seconds"] <= s["step_seconds"] and s["generation_seconds"] > 0, (mode, s)
        assert 0 <= side["reward_mean"] <= 1 and side["last_steps"] == STEPS
        assert side["tokens_per_second"] > 0 and side["logprob_diff_max"] < 1e-3
    # sync: the trainer waits for all of generation, and trains on the policy that sampled
    assert all(s["wait_seconds"] == s["generation_seconds"] for s in modes["sync"]["per_step"])
    assert modes["sync"]["staleness_max"] == 0 and 0 <= modes["async"]["staleness_max"] <= K
    assert set(result["async_over_sync"]) == {"step_seconds", "wait_seconds"}
    assert result["async_over_sync"]["step_seconds"] == pytest.approx(
        modes["async"]["step_seconds"] / modes["sync"]["step_seconds"])
    table = format_table(result).splitlines()
    assert table[2].startswith("sync ") and table[3].startswith(f"async (K={K})") and len(table) == 6
    assert result["plot"] == str(tmp_path / "out" / "reward_vs_time.png") and Path(result["plot"]).is_file()
