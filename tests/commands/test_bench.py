"""`lorasync bench sync` runs and reports what it promises (a smoke test on the tiny shape;
the benchmark itself is a command, and its timings are not asserted)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.vllm
def test_bench_sync_json_on_tiny_shape(tmp_path):
    """With the server path too: its output must not reach stdout, which is one JSON object."""
    r = subprocess.run(
        [sys.executable, "-m", "lorasync.cli", "bench", "sync", "--shape", "tiny", "--rank", "4",
         "--repeats", "2", "--server", "--json"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    server = result["server"]
    for key in ("compressed", "raw"):
        assert {"median_s", "min_s", "wire_bytes", "wire_over_merged", "max_abs_logprob_diff"} <= set(server[key])
        assert server[key]["max_abs_logprob_diff"] < 0.2  # bf16, as the colocated strategies
    assert 0 < server["compressed"]["wire_bytes"] < server["raw"]["wire_bytes"]
    assert server["raw"]["wire_over_merged"] < 1
    assert set(result["strategies"]) == {"streaming", "merge-unmerge", "adapter"}
    for stats in result["strategies"].values():
        assert {"min_s", "median_s", "bytes_sent", "tensors_sent", "peak_extra_bytes"} <= set(stats)
    assert {"min_s", "median_s", "bytes_sent"} <= set(result["floor"])
    assert result["speedup_vs_merge_unmerge"] > 0 and result["ratio_to_floor"] > 0
    assert result["largest_tensor_bytes"] > 0
    streaming, baseline = result["strategies"]["streaming"], result["strategies"]["merge-unmerge"]
    assert streaming["bytes_sent"] == result["floor"]["bytes_sent"] < baseline["bytes_sent"]
    assert streaming["base_max_abs_change"] == 0
    adapter = result["strategies"]["adapter"]
    assert 0 < adapter["bytes_sent"] < streaming["bytes_sent"]
    assert adapter["base_max_abs_change"] == 0
    decode = result["decode"]
    assert decode["merged_s_per_token"] > 0 and decode["adapter_s_per_token"] > 0
    assert decode["merged_over_adapter_throughput"] == pytest.approx(
        decode["adapter_s_per_token"] / decode["merged_s_per_token"]
    )
    assert result["auto"]["strategy"] in ("streaming", "adapter")
    assert result["auto"]["tokens_per_step"] == decode["tokens"]
