"""`lorasync serve` fails closed: no token, no server; the command it runs guards every route.
Where a command's token comes from: --token-file, else the deprecated --token, else
$LORASYNC_TOKEN (the commands' wiring of it: tests/commands/test_cli.py; a live server
started with --token-file: tests/server/serve/test_routes.py)."""

import pytest

from lorasync.server import BACKEND, TOKEN_ENV
from lorasync.server.serve.launch import (
    LEASE_MIDDLEWARE,
    MIDDLEWARE,
    TOKEN_FLAG_DEPRECATED,
    read_token_file,
    resolve_token,
    serve_command,
    serve_env,
)
from tests.helpers import run_lorasync


@pytest.mark.slow  # a fresh `lorasync` process: torch and transformers imported, 5-10 s on 2 cores
def test_serve_refuses_to_start_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    r = run_lorasync("serve", "--model", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "needs a token: pass --token-file PATH or set LORASYNC_TOKEN" in r.stderr


def test_serve_command_binds_loopback_with_the_guard_and_passes_vllm_arguments():
    cmd = serve_command("/m", extra=["--dtype", "float32"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    # vLLM adds them in turn, the last added outermost: the guard, then the pause lease inside it
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--middleware"] == [LEASE_MIDDLEWARE, MIDDLEWARE]
    assert f'"backend": "{BACKEND}"' in cmd[cmd.index("--weight-transfer-config") + 1]
    assert cmd[-2:] == ["--dtype", "float32"]


def test_serve_env_turns_on_the_update_routes_and_hands_the_guard_its_token():
    env = serve_env("s3cret")
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env[TOKEN_ENV] == "s3cret"


@pytest.mark.slow  # a fresh `lorasync` process: torch and transformers imported, 5-10 s on 2 cores
def test_other_commands_still_refuse_unknown_arguments():
    r = run_lorasync("make-tiny", "--out", "x", "--bogus", timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


# --- where the token comes from -----------------------------------------------------------------


def token_file(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_a_token_file_wins_over_the_environment(tmp_path):
    env = {TOKEN_ENV: "from-env"}
    assert resolve_token(environ=env) == ("from-env", [])
    assert resolve_token(token_file(tmp_path, "from-file\n"), environ=env) == ("from-file", [])
    assert resolve_token(environ={}) == ("", [])  # the caller refuses, saying how to pass one
    with pytest.raises(ValueError, match="one way"):
        resolve_token(token_file(tmp_path, "a"), "b", environ=env)


def test_the_deprecated_flag_still_works_and_says_why_not_and_what_instead():
    token, warnings = resolve_token(token="from-flag", environ={TOKEN_ENV: "from-env"})
    assert (token, warnings) == ("from-flag", [TOKEN_FLAG_DEPRECATED])
    for words in ("deprecated", "`ps`", "history", "--token-file PATH", "$LORASYNC_TOKEN"):
        assert words in TOKEN_FLAG_DEPRECATED


def test_a_token_file_is_stripped_and_one_open_to_others_warns_with_the_chmod_fix(tmp_path):
    assert read_token_file(token_file(tmp_path, "  t0k3n \r\n\n")) == ("t0k3n", [])
    path = token_file(tmp_path, "t0k3n\n", mode=0o644)
    token, warnings = read_token_file(path)
    assert token == "t0k3n" and len(warnings) == 1
    assert "mode 0644" in warnings[0] and f"chmod 600 {path}" in warnings[0]
    assert read_token_file(token_file(tmp_path, "t0k3n", mode=0o640))[1]  # the group alone too


@pytest.mark.parametrize(
    "text, error, message",
    [
        (None, FileNotFoundError, "no such file; write it with .*chmod 600"),
        ("", ValueError, "is empty: put the token in it"),
        (" \n\t\n", ValueError, "is empty"),
        ("one\ntwo\n", ValueError, "holds 2 words: a token is one word"),
        (b"\xff\xfe", ValueError, "cannot read it \\(not UTF-8 text\\)"),
    ],
    ids=["missing", "empty", "blank", "two-lines", "binary"],
)
def test_a_bad_token_file_is_refused_with_the_fix(tmp_path, text, error, message):
    path = tmp_path / "token"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(error, match=f"--token-file {path}.*{message}"):
        read_token_file(str(path))


def test_a_folder_is_not_a_token_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        read_token_file(str(tmp_path))
