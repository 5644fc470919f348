"""`lorasync bench trl`: lorasync and TRL's GRPOTrainer on the same run, end to end on a tiny
model (the numbers' relations, not their values: a shared 2-core machine), and the run's
settings: refused with the fix, and the TRL side's batch shape, rows and rewards as lorasync's."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorasync.commands.cli import main
from lorasync.bench.trl import (
    TrlBenchConfig, format_table, step_rows, train_config,
)
from lorasync.train.data import batch_at, load_rows
from tests.helpers import run_lorasync

# TRL renders conversational prompts with the chat template; the tiny tokenizers have none.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
STEPS = 2
CRASH = "lorasync (TRL's own sync crashed: AttributeError: 'Parameter' object has no attribute 'weight_loader')"


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory) -> str:
    """A copy of the tiny qwen2 whose tokenizer has a chat template."""
    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model("qwen2"), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.vllm
def test_bench_trl_runs_both_sides_and_reports_consistent_numbers(chat_model, tmp_path):
    r = run_lorasync(
        "bench", "trl", "--model", chat_model, "--steps", str(STEPS), "--eval-n", "8",
        "--prompts-per-step", "2", "--num-generations", "2", "--out", str(tmp_path / "out"), "--json",
        cwd=tmp_path, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # the libraries' prints and logs must not reach stdout
    assert result["config"]["steps"] == STEPS and result["machine"]["cpus"] >= 1
    trl = result["sides"]["trl"]
    # TRL's own sync works on some vLLM CPU backends and crashes on others: either is reported
    assert result["trl_sync"] == trl["sync"]
    assert (trl["sync"], trl["own_sync_error"]) == ("trl", None) or trl["sync"] == CRASH
    assert list(result["sides"]) == ["lorasync", "plain", "trl"]
    assert result["sides"]["lorasync"]["shared_prefix"] and not result["sides"]["plain"]["shared_prefix"]
    for name, side in result["sides"].items():
        assert side["steps"] == STEPS and [s["step"] for s in side["per_step"]] == [1, 2], name
        assert side["steps_per_second"] == pytest.approx(STEPS / sum(s["step_seconds"] for s in side["per_step"]))
        assert side["tokens_per_second"] > 0 and side["peak_rss_bytes"] > 100e6, name
    # the same run: every side's completions go through the same number of tokens per step
    # (lorasync's two share the generations: same seed, same weights up to rounding)
    assert result["sides"]["lorasync"]["per_step"][0]["completion_tokens"] == \
        result["sides"]["plain"]["per_step"][0]["completion_tokens"]
    lorasync, plain = (result["sides"][n]["per_step"][0]["trainer_tokens"] for n in ("lorasync", "plain"))
    assert lorasync < plain  # each prompt once per group
    assert set(result["ratios"]) == {"lorasync/plain", "lorasync/trl"}
    for name, side in result["sides"].items():
        for s in side["per_step"]:
            assert 0 < s["generation_seconds"] and 0 < s["sync_seconds"], (name, s)
            assert s["generation_seconds"] + s["sync_seconds"] <= s["step_seconds"], (name, s)
        parts = side["generation_seconds"] + side["sync_seconds"] + side["train_seconds"]
        assert side["train_seconds"] > 0 and parts == pytest.approx(side["step_seconds"]), name
        assert side["reward_mean"] is not None and 0 <= side["reward_mean"] <= 1.25, name
        assert (Path(side["adapter"]) / "adapter_model.safetensors").is_file(), name
        after = side["accuracy_after"]
        assert after["n"] == 8 and 0 <= after["accuracy"] <= 1 and after["adapter"] == side["adapter"]
    assert result["accuracy_before"]["n"] == 8 and result["accuracy_before"]["adapter"] is None
    table = format_table(result).splitlines()
    assert table[2].startswith("lorasync ") and table[3].startswith("lorasync, prefix unshared")
    assert table[4].startswith("TRL (TRL sync)" if trl["sync"] == "trl" else "TRL (lorasync sync)")
    # lorasync's sides account for their memory: each part measured or counted, the rest the peak's
    for i, name in ((5, "lorasync"), (6, "plain")):
        parts = result["sides"][name]["memory"]
        assert min(parts["trainer_weights"], parts["optimizer_and_gradients"], parts["kv_cache"]) > 0, parts
        assert parts["activations"] >= 0 and sum(parts.values()) > 0
        assert table[i].startswith(f"memory of {name}, GB: process before ") and " = peak " in table[i]
    assert "memory" not in result["sides"]["trl"]
    assert table[7].startswith("steps per second, lorasync/plain: ")
    assert (len(table) == 9) == (trl["sync"] != "trl")  # a crash is said below the table


@pytest.fixture
def model_dir(tmp_path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", 0, r"--steps = 0: must be >= 1"),
        ("num_generations", 1, r"--num-generations = 1: GRPO compares completions"),
        ("lr", 0.0, r"--lr = 0.0: must be > 0"),
        ("eval_n", 0, r"--eval-n = 0: must be >= 1"),
        ("dtype", "float16", r"--dtype = 'float16': use one of float32, bfloat16"),
        ("task", "gsm8k", r"--task = 'gsm8k': use one of arith"),
        ("grad_accum", 3, r"--grad-accum = 3: must divide prompts-per-step x num-generations = 64"),
        ("sides", ("lorasync", "vllm"), r"--sides = 'lorasync,vllm': name each of lorasync, plain, trl at most once"),
        ("sides", ("trl", "trl"), r"--sides = 'trl,trl': name each of"),
        ("sides", (), r"--sides = '': name each of"),
    ],
)
def test_config_refuses_bad_values_with_the_fix(model_dir, field, value, match):
    with pytest.raises(ValueError, match=match):
        TrlBenchConfig(model=model_dir, **{field: value})


def test_config_needs_a_model_folder(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--model = .*: no config.json there"):
        TrlBenchConfig(model=str(tmp_path))
    # the CLI says so in one line, exit status 2, before anything is built
    assert main(["bench", "trl", "--model", str(tmp_path), "--steps", "2"]) == 2
    assert "lorasync bench: error: --model" in capsys.readouterr().err


def test_trl_reads_lorasync_s_prompts_in_lorasync_s_order(model_dir):
    train = train_config(TrlBenchConfig(model=model_dir, steps=3, prompts_per_step=4))
    rows, all_rows = step_rows(train), load_rows(train.data)
    assert len(rows) == 12 and len({r["prompt"][0]["content"] for r in rows}) == 12  # one epoch
    for step in range(3):
        assert rows[4 * step : 4 * (step + 1)] == batch_at(all_rows, step, 4, train.optim.seed)
