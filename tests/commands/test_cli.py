"""The CLI end to end, as a user runs it: make a model and an adapter, then sync-check."""

import json
import subprocess
import sys

import pytest


def lorasync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorasync.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    r = lorasync("make-tiny", "--arch", "qwen3", "--out", str(root / "base"))
    assert r.returncode == 0, r.stderr
    r = lorasync(
        "make-adapter", "--base", str(root / "base"), "--out", str(root / "adapter"),
        "--targets", "q_proj", "v_proj", "--rank", "4", "--modules-to-save", "lm_head",
        "--adapter-name", "pol", "--seed", "7",
    )
    assert r.returncode == 0, r.stderr
    return root


@pytest.mark.vllm
def test_sync_check_json(made):
    r = lorasync(
        "sync-check", "--base", str(made / "base"), "--adapter", str(made / "adapter"),
        "--repeat", "3", "--json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout holds the JSON object and nothing else
    assert result["max_abs_logprob_diff"] <= 1e-4
    assert result["weight_version"] == 3
    assert result["tensors_sent"] > 0 and result["bytes_sent"] > 0 and result["sync_seconds"] > 0
    assert 0 <= result["base_max_abs_change"] < 1e-6


@pytest.mark.vllm
def test_sync_check_exit_code_1_above_tolerance(made):
    r = lorasync(
        "sync-check", "--base", str(made / "base"), "--adapter", str(made / "adapter"),
        "--tolerance", "1e-12", "--json",
    )
    assert r.returncode == 1
    assert json.loads(r.stdout)["ok"] is False


def test_sync_check_missing_adapter_is_a_clear_error(made):
    r = lorasync("sync-check", "--base", str(made / "base"), "--adapter", str(made / "none"))
    assert r.returncode == 2
    assert "error: adapter folder" in r.stderr and "does not exist" in r.stderr


def test_bad_repeat_is_a_clear_error(made):
    r = lorasync(
        "sync-check", "--base", str(made / "base"), "--adapter", str(made / "adapter"),
        "--repeat", "0",
    )
    assert r.returncode == 2 and "--repeat must be >= 1, got 0" in r.stderr


@pytest.mark.vllm
def test_1000_bf16_syncs_leave_base_bit_identical_unlike_merge_unmerge(tmp_path):
    """The drift target of issue 3, on the tiny model: streaming 0, merge-unmerge > 0."""
    from lorasync.check import SyncCheckConfig, run_sync_check

    assert lorasync("make-tiny", "--arch", "llama", "--out", str(tmp_path / "base")).returncode == 0
    r = lorasync("make-adapter", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ad"))
    assert r.returncode == 0
    results = {
        strategy: run_sync_check(
            SyncCheckConfig(str(tmp_path / "base"), str(tmp_path / "ad"), "bfloat16", 1000, strategy=strategy)
        )
        for strategy in ("streaming", "merge-unmerge")
    }
    assert results["streaming"]["base_max_abs_change"] == 0
    assert results["streaming"]["ok"] and results["streaming"]["weight_version"] == 1000
    assert results["merge-unmerge"]["base_max_abs_change"] > 0
