"""`lorasync.backend.check`, sync-check's core: its settings, refused with the fix before
anything is built, and 1000 syncs on a real engine (marked `vllm`). The measuring and the
verdict's text: tests/sync/test_check.py; the command: tests/commands/test_cli.py."""

import pytest

from lorasync.backend.check import SyncCheckConfig, run_sync_check
from lorasync.sync.base import Strategy
from tests.helpers import run_lorasync


def test_sync_check_strategy_follows_the_engine():
    assert SyncCheckConfig("b", "a").strategy is Strategy.STREAMING
    servers = SyncCheckConfig("b", "a", servers=["http://127.0.0.1:8000"])
    assert (servers.kind, servers.strategy) == ("server", Strategy.FACTORS)
    assert SyncCheckConfig("b", "a", strategy="merge-unmerge", servers=["u"]).strategy is Strategy.MERGE_UNMERGE


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(strategy="factors"), "--strategy factors needs --server .*use one of streaming, merge-unmerge, adapter$"),
        (dict(strategy="adapter", servers=["u"]), "--strategy adapter does not work with --server"),
        (dict(strategy="auto"), "--strategy auto decides by a training run's tokens per step"),
        (dict(strategy="fast"), "--strategy must be one of streaming, merge-unmerge, adapter, factors, auto"),
        (dict(dtype="int8"), "--dtype must be one of float32, bfloat16, float16, got 'int8'"),
        (dict(repeat=0), "--repeat must be >= 1, got 0"),
        (dict(tolerance=0.0), "--tolerance must be > 0, got 0.0"),
    ],
)
def test_sync_check_settings_are_refused_with_the_fix(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SyncCheckConfig("base", "adapter", **settings)


@pytest.mark.vllm
def test_1000_bf16_syncs_leave_base_bit_identical_unlike_merge_unmerge(tmp_path):
    """The drift target of issue 3, on the tiny model: streaming 0, merge-unmerge > 0."""
    assert run_lorasync("make-tiny", "--arch", "llama", "--out", str(tmp_path / "base")).returncode == 0
    r = run_lorasync("make-adapter", "--base", str(tmp_path / "base"), "--out", str(tmp_path / "ad"))
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
