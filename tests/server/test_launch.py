"""`lorasync serve` fails closed: no token, no server; the command it runs guards every route."""

from lorasync.server import BACKEND, TOKEN_ENV
from lorasync.server.launch import MIDDLEWARE, serve_command, serve_env
from tests.helpers import run_lorasync


def test_serve_refuses_to_start_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    r = run_lorasync("serve", "--model", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "needs a token" in r.stderr


def test_serve_command_binds_loopback_with_the_guard_and_passes_vllm_arguments():
    cmd = serve_command("/m", extra=["--dtype", "float32"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    assert f'"backend": "{BACKEND}"' in cmd[cmd.index("--weight-transfer-config") + 1]
    assert cmd[-2:] == ["--dtype", "float32"]


def test_serve_env_turns_on_the_update_routes_and_hands_the_guard_its_token():
    env = serve_env("s3cret")
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env[TOKEN_ENV] == "s3cret"


def test_other_commands_still_refuse_unknown_arguments():
    r = run_lorasync("make-tiny", "--out", "x", "--bogus", timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
