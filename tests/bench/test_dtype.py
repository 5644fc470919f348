"""`lorasync bench dtype` (`bench/dtype.py`): one CLI run on the tiny shape reports both
dtypes' train step and decode seconds, and the bfloat16 / float32 ratios that follow from
them. Timings themselves are not asserted (a shared 2-core machine)."""

import json

import pytest

from tests.helpers import run_lorasync

pytestmark = pytest.mark.vllm


def test_bench_dtype_reports_both_dtypes_and_their_ratios(tmp_path):
    r = run_lorasync("bench", "dtype", "--shape", "tiny", "--repeats", "1", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    d = result["dtypes"]
    assert set(d) == {"float32", "bfloat16"} and result["machine"]["cpu_capability"]
    for key in ("train_step_s", "decode_s_per_token"):
        assert all(v[key] > 0 for v in d.values())
        assert result["bf16_over_fp32"][key] == pytest.approx(d["bfloat16"][key] / d["float32"][key])
