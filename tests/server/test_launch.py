"""`lorasync serve` fails closed: no token, no server; the command it runs guards every route."""

import os
import subprocess
import sys

from lorasync.server import MIDDLEWARE, serve_command


def test_serve_refuses_to_start_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LORASYNC_TOKEN"}
    r = subprocess.run(
        [sys.executable, "-m", "lorasync.cli", "serve", "--model", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 2 and "needs a token" in r.stderr


def test_serve_command_binds_loopback_with_the_guard_and_passes_vllm_arguments():
    cmd = serve_command("/m", extra=["--dtype", "float32"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    assert '"backend": "lorasync"' in cmd[cmd.index("--weight-transfer-config") + 1]
    assert cmd[-2:] == ["--dtype", "float32"]


def test_other_commands_still_refuse_unknown_arguments():
    r = subprocess.run(
        [sys.executable, "-m", "lorasync.cli", "make-tiny", "--out", "x", "--bogus"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
