"""Where this machine keeps what lorasync downloads, converts and measures (`machine.cache_dir`):
$LORASYNC_CACHE when set, ~/.cache/lorasync otherwise; a process's peak memory, measured afresh
after `reset_peak_rss` (a benchmark's sides each get their own)."""

import sys

import pytest

from lorasync.machine import cache_dir, peak_rss_bytes, reset_peak_rss


def test_cache_dir_follows_lorasync_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASYNC_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("LORASYNC_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "lorasync")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_the_peak_starts_afresh_after_a_reset():
    block = bytearray(256 << 20)  # 256 MiB, touched
    block[:: 4096] = b"x" * len(block[:: 4096])
    high = peak_rss_bytes()
    del block
    assert high is not None and high > 256 << 20
    assert reset_peak_rss()
    assert peak_rss_bytes() < high - (200 << 20)  # the freed block no longer counts
