"""`lorasync bench verdict` on a tiny tied model (SmolLM2's shape of problem: tied embeddings, so
the lm_head case trains the one shared copy): every right sync passes both levels at every
sync, every broken one is caught by at least one level, and the table says so. One CLI run
(--json, --syncs 2); the table is formatted from its JSON."""

import json

import pytest

from lorasync.bench.verdict_report import format_table
from lorasync.sync.policy import AdapterSpec, make_random_adapter
from tests.helpers import run_lorasync

pytestmark = pytest.mark.vllm

CORRECT = {"zero adapter", "random adapter (std 0.01)", "trained adapter", "merge-unmerge",
           "generation after a sync"}
BROKEN = {"skipped sync", "stale tensor", "wrong scale", "swapped layers", "stale lm_head",
          "stale prefix cache"}
ONCE = {"merge-unmerge", "generation after a sync"}  # one sync, one verdict


@pytest.fixture(scope="module")
def result(tiny_model, tmp_path_factory):
    model, cwd = tiny_model("qwen2-tied"), tmp_path_factory.mktemp("verdict")
    # a saved adapter stands in for a trained one: --trained loads it as sync-check would
    trained = make_random_adapter(model, cwd / "trained", AdapterSpec(rank=4, init_std=0.01, seed=1))
    r = run_lorasync("bench", "verdict", "--model", model, "--syncs", "2", "--rank", "4",
                     "--trained", str(trained), "--json", cwd=cwd, timeout=600,
                     env={"OMP_NUM_THREADS": "1"})  # as the docs run it: a shared machine's cores
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # nothing but the JSON on stdout


def test_right_syncs_pass_and_broken_ones_are_caught(result):
    rows = {row["case"]: row for row in result["cases"]}
    assert set(rows) == CORRECT | BROKEN
    for name in CORRECT:
        row = rows[name]
        assert row["false_alarms"] == {"weights": 0, "logprobs": 0, "cache": 0}, (name, row)
        assert row["weights"]["mismatches"] == 0 and row["right"], name
        assert row["verdicts"] == (1 if name in ONCE else 2)
        assert len(row["per_verdict"]) == row["verdicts"]
    assert rows["merge-unmerge"]["weights"]["exact"] is False  # judged within the merge's rounding
    assert rows["zero adapter"]["weights"]["exact"] is True
    for name in BROKEN:
        assert rows[name]["right"] and rows[name]["caught_by"], (name, rows[name])
    # the weight level sees every broken case in the weights, naming the tensor
    assert all("weights" in rows[name]["caught_by"] for name in BROKEN - {"stale prefix cache"})
    # a stale prefix cache holds the right weights: generation's logprobs see it, and the
    # cache level, the engine against itself, which is exact while the cache is right
    assert rows["stale prefix cache"]["caught_by"] == ["logprobs", "cache"]
    assert rows["stale prefix cache"]["weights"]["mismatches"] == 0
    assert result["cache_floor"]["max_abs_diff"] == 0
    assert rows["generation after a sync"]["cache"] == {
        "ok": 1, "checks": 1, "mean_abs_diff": 0.0, "quantile_abs_diff": 0.0}
    assert rows["stale tensor"]["weights"]["mismatches"] == 1
    assert rows["stale tensor"]["weights"]["first_mismatch"].endswith("self_attn.q_proj.weight")
    assert rows["swapped layers"]["weights"]["mismatches"] == 2
    assert "embed_tokens" in rows["stale lm_head"]["weights"]["first_mismatch"]
    assert result["all_right"]


def test_the_result_records_where_and_against_what_it_was_measured(result):
    assert result["command"].startswith("OMP_NUM_THREADS=1 lorasync bench verdict --model ")
    assert "--syncs 2 --rank 4 --trained " in result["command"]
    assert result["machine"]["cpu_model"] and result["date"] and result["commit"]
    floor, bounds = result["floor"], result["bounds"]
    assert floor["tokens"] == result["probes"]["tokens"] > 0
    assert bounds["mean"] > bounds["mean_factor"] * floor["mean_abs_diff"]
    assert bounds["quantile"] > bounds["quantile_factor"] * floor["quantile_abs_diff"]


def test_the_table_has_a_row_per_case_and_the_header(result):
    table = format_table(result)
    lines = table.splitlines()
    assert lines[1] == f"command: {result['command']}"
    assert any(line.startswith("machine: ") for line in lines[:5])
    assert any(line.startswith("case ") and "first mismatch" in line and "verdict" in line for line in lines)
    for row in result["cases"]:
        line = next(line for line in lines if line.startswith(row["case"] + " "))
        assert ("right: " in line) and ("WRONG" not in line), line
    assert table.splitlines()[-1] == "every verdict right"
