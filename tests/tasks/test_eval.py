"""`lorasync eval`: its settings, refused with the fix before anything is built; and a run on a
tiny model with an adapter synced into the engine (a real vLLM engine, marked `vllm`)."""

import json

import pytest

from lorasync.tasks.eval import EvalConfig, format_result
from lorasync.sync.policy import AdapterSpec, make_random_adapter
from tests.helpers import run_lorasync


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task", "gsm8k", "--task must be one of arith, calc, got 'gsm8k'"),
        ("split", "valid", "--split must be one of train, test, got 'valid'"),
        ("n", 0, "--n must be >= 1, got 0"),
        ("temperature", -1.0, r"--temperature must be >= 0 \(0: greedy\), got -1.0"),
        ("max_tokens", 0, "--max-tokens must be >= 1, got 0"),
        ("dtype", "int8", "--dtype must be one of float32"),
        ("levels", ["div"], "--levels: arith levels must be some of add1, add2, sub2, mul, got"),
    ],
)
def test_bad_settings_name_the_flag_and_the_choices(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(model="m", **{field: value})


@pytest.mark.vllm
def test_eval_a_tiny_model_with_an_adapter(tiny_model, tmp_path):
    base = tiny_model("llama")
    make_random_adapter(base, tmp_path / "adapter", AdapterSpec(targets=["q_proj", "v_proj"], rank=4))
    r = run_lorasync(
        "eval", "--model", base, "--adapter", str(tmp_path / "adapter"), "--task", "arith",
        "--split", "test", "--n", "12", "--max-tokens", "4", "--temperature", "1",
        "--levels", "add1", "sub2", "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # stdout holds the JSON object and nothing else
    assert (result["task"], result["split"], result["n"], result["temperature"]) == ("arith", "test", 12, 1.0)
    assert result["weight_version"] == 1  # the adapter was synced before generating
    assert 0 <= result["accuracy"] <= 1 and set(result["accuracy_by_level"]) == {"add1", "sub2"}
    # a random tiny model rarely ends its turn: nearly every completion runs to the limit
    assert 0 < result["mean_completion_tokens"] <= 4 and 0 <= result["truncated"] <= 1
    assert len(result["samples"]) == 5 and result["samples"][0]["question"].startswith("What is ")
    human = format_result(result)
    assert human.startswith("arith/test: accuracy ") and "add1 " in human and "cut off at 4 tokens" in human
