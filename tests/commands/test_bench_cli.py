"""`lorasync bench trl` and `lorasync bench rollout`: two commands, each with only its own
flags; `bench train`, the old name of `bench trl`, says so in a note and sends its old
`--rollout` to `bench rollout`. Parsing and the configs built from it: no model, no engine."""

import json

import pytest

from lorasync.commands.bench_cli import _bench_rollout, _bench_trl, _bench_train
from lorasync.commands.cli import build_parser, main

NOTE = "lorasync bench: note: `bench train` is now `lorasync bench trl`; with --rollout, `lorasync bench rollout`"


@pytest.fixture
def model_dir(tmp_path) -> str:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return str(tmp_path / "model")


@pytest.fixture
def ran(monkeypatch) -> list:
    """The configs the benches were called with; no bench runs."""
    configs = []

    def run(config):
        configs.append(config)
        return {"ran": type(config).__name__}

    monkeypatch.setattr("lorasync.bench.trl.run_trl_bench", run)
    monkeypatch.setattr("lorasync.bench.rollout.run_rollout_bench", run)
    return configs


def test_each_command_parses_its_own_flags_with_their_defaults():
    parser = build_parser()
    trl = parser.parse_args(["bench", "trl", "--model", "m"])
    assert trl.func is _bench_trl
    assert (trl.steps, trl.dtype, trl.seed, trl.out, trl.eval_n) == (10, "float32", 0, None, None)
    rollout = parser.parse_args(["bench", "rollout", "--model", "tiny"])
    assert rollout.func is _bench_rollout
    assert (rollout.modes, rollout.engine, rollout.in_flight, rollout.max_staleness, rollout.out) == (
        "sync,async", "colocated", "wait", None, "runs/bench_rollout")
    assert parser.parse_args(["bench", "train", "--model", "m"]).func is _bench_train
    assert not {"modes", "max_staleness", "engine", "in_flight"} & set(vars(trl))
    assert not {"task", "eval_n", "rollout"} & set(vars(rollout))


@pytest.mark.parametrize(
    "command, flags",
    [
        ("rollout", ["--eval-n", "5"]),
        ("rollout", ["--task", "arith"]),
        ("rollout", ["--rollout", "sync,async"]),
        ("trl", ["--max-staleness", "1"]),
        ("trl", ["--engine", "server"]),
        ("trl", ["--in-flight", "keep"]),
        ("trl", ["--modes", "sync,async"]),
        ("trl", ["--rollout", "sync,async"]),
    ],
)
def test_the_other_command_s_flags_are_not_taken(command, flags, capsys, ran):
    with pytest.raises(SystemExit) as exit:
        main(["bench", command, "--model", "tiny", *flags])
    assert exit.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err
    assert not ran


def test_rollout_builds_its_config_from_its_flags(tmp_path, capsys, ran):
    assert main(["bench", "rollout", "--model", "tiny", "--modes", "async", "--max-staleness", "2",
                 "--engine", "server", "--in-flight", "wait,keep", "--steps", "3", "--prompts-per-step", "2",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ran": "RolloutBenchConfig"}
    (config,) = ran
    assert (config.modes, config.max_staleness, config.engine, config.in_flight) == (
        ("async",), 2, "server", ("wait", "keep"))
    assert (config.steps, config.prompts_per_step, config.out) == (3, 2, str(tmp_path / "out"))
    assert config.num_generations == 8 and config.lr == 2e-3  # the tiny demo's, as --help says


def test_trl_builds_its_config_and_refuses_the_tiny_model(model_dir, capsys, ran):
    assert main(["bench", "trl", "--model", model_dir, "--steps", "3", "--eval-n", "5", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"ran": "TrlBenchConfig"} and "note" not in captured.err
    (config,) = ran
    assert (config.model, config.steps, config.eval_n, config.prompts_per_step, config.out) == (
        model_dir, 3, 5, 8, "runs/bench_trl")
    assert main(["bench", "trl", "--model", "tiny"]) == 2
    assert ("lorasync bench: error: --model = 'tiny': the tiny demo model is for comparing rollout modes "
            "(lorasync bench rollout --model tiny)") in capsys.readouterr().err
    assert len(ran) == 1


def test_train_is_trl_with_a_note(model_dir, capsys, ran):
    assert main(["bench", "train", "--model", model_dir, "--steps", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"ran": "TrlBenchConfig"}
    assert captured.err.strip() == NOTE  # one line
    (config,) = ran
    assert (config.model, config.steps) == (model_dir, 3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rollout", "sync,async"], "--rollout = 'sync,async': the rollout comparison is its own command: "
         "lorasync bench rollout (the same run, its --modes)"),
        (["--max-staleness", "1"], "--max-staleness = '1': the rollout comparison is its own command: "
         "lorasync bench rollout (the same run, its --max-staleness)"),
        (["--engine", "server"],
         "--engine = 'server': the rollout comparison is its own command: lorasync bench rollout"),
    ],
)
def test_train_with_rollout_flags_names_bench_rollout(flags, message, capsys, ran):
    assert main(["bench", "train", "--model", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert NOTE in err and f"lorasync bench: error: {message}" in err
    assert not ran
