"""The admin token: `lorasync serve --admin-token-file` hands it to the guard through the
environment (never the command line), and the clients send it for the sync routes
(`ServerEngine(admin_token=...)`, sync-check's --admin-token-file, train's
engine.admin_token_file); without one the token is the admin token too. `serve` drops
inherited switches (the admin token, vLLM's runtime LoRA routes) unless its flags ask."""

import os

import pytest

from lorasync.commands import cli
from lorasync.server import ADMIN_TOKEN_ENV, TOKEN_ENV
from lorasync.server.serve.guard import CALLBACK_ANYWHERE_ENV, RUNTIME_LORA_ENV
from lorasync.server.serve.launch import VLLM_RUNTIME_LORA_ENV, resolve_admin_token
from lorasync.train.config import ConfigError, EngineSection


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def serve(monkeypatch, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment `lorasync serve ARGS` would replace itself with."""
    ran = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: ran.append((argv, env)))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert cli.main(["serve", *args]) == 0
    (got,) = ran
    return got


def test_serve_passes_the_admin_token_by_environment_only(tmp_path, monkeypatch):
    token, admin = write(tmp_path, "token", "tok-1\n"), write(tmp_path, "admin", "adm-2\n")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "inherited")
    argv, env = serve(monkeypatch, "--model", str(tmp_path), "--token-file", token, "--admin-token-file", admin)
    assert env[TOKEN_ENV] == "tok-1" and env[ADMIN_TOKEN_ENV] == "adm-2"
    assert not any("tok-1" in a or "adm-2" in a for a in argv)
    # without the flag: $LORASYNC_ADMIN_TOKEN, as --token-file falls back to $LORASYNC_TOKEN
    _, env = serve(monkeypatch, "--model", str(tmp_path), "--token-file", token)
    assert env[ADMIN_TOKEN_ENV] == "inherited"
    monkeypatch.delenv(ADMIN_TOKEN_ENV)
    _, env = serve(monkeypatch, "--model", str(tmp_path), "--token-file", token)
    assert ADMIN_TOKEN_ENV not in env  # the guard takes the token as the admin token


def test_serve_drops_an_inherited_runtime_lora_switch_unless_asked(tmp_path, monkeypatch):
    token = write(tmp_path, "token", "tok-1\n")
    for name in (VLLM_RUNTIME_LORA_ENV, RUNTIME_LORA_ENV, CALLBACK_ANYWHERE_ENV):
        monkeypatch.setenv(name, "1")
    _, env = serve(monkeypatch, "--model", str(tmp_path), "--token-file", token)
    assert not {VLLM_RUNTIME_LORA_ENV, RUNTIME_LORA_ENV, CALLBACK_ANYWHERE_ENV} & set(env)
    _, env = serve(monkeypatch, "--model", str(tmp_path), "--token-file", token, "--allow-runtime-lora",
                   "--allow-callback-anywhere")
    assert env[VLLM_RUNTIME_LORA_ENV] == env[RUNTIME_LORA_ENV] == env[CALLBACK_ANYWHERE_ENV] == "1"


def test_an_admin_token_file_is_read_like_a_token_file(tmp_path):
    assert resolve_admin_token(environ={ADMIN_TOKEN_ENV: "env"}) == ("env", [])
    assert resolve_admin_token(environ={}) == ("", [])  # the token serves as the admin token
    path = write(tmp_path, "admin", "adm\n")
    assert resolve_admin_token(path, environ={ADMIN_TOKEN_ENV: "env"}) == ("adm", [])
    with pytest.raises(FileNotFoundError, match="engine.admin_token_file /nope: no such file"):
        resolve_admin_token("/nope", flag="engine.admin_token_file")
    with pytest.raises(ValueError, match="--admin-token-file .* is empty"):
        resolve_admin_token(write(tmp_path, "empty", "\n"))


def test_the_engine_section_takes_an_admin_token_file_for_servers_only():
    section = EngineSection(kind="server", servers=["http://127.0.0.1:8000"], admin_token_file="/run/admin")
    assert section.admin_token_file == "/run/admin"
    assert EngineSection(kind="server", servers=["http://h:1"]).admin_token_file is None
    with pytest.raises(ConfigError, match=r"engine.admin_token_file = '/run/admin': .*engine.kind: server"):
        EngineSection(kind="colocated", admin_token_file="/run/admin")
    with pytest.raises(ConfigError, match=r"engine.admin_token_file = '': write the path"):
        EngineSection(kind="server", servers=["http://h:1"], admin_token_file="")
    with pytest.raises(ConfigError, match=r"engine.admin_token_file = 7"):
        EngineSection(kind="server", servers=["http://h:1"], admin_token_file=7)


def test_sync_check_takes_an_admin_token_file(tmp_path, monkeypatch):
    """The flag reaches the engine (the run itself stopped at its first step)."""
    seen = {}

    def run(config, progress):
        seen.update(token=config.token, admin=config.admin_token)
        raise SystemExit(0)

    monkeypatch.setattr("lorasync.backend.check.run_sync_check", run)
    token, admin = write(tmp_path, "token", "tok\n"), write(tmp_path, "admin", "adm\n")
    with pytest.raises(SystemExit):
        cli.main(["sync-check", "--base", str(tmp_path), "--adapter", str(tmp_path), "--server", "http://127.0.0.1:1",
                  "--token-file", token, "--admin-token-file", admin])
    assert seen == {"token": "tok", "admin": "adm"}


def test_train_takes_the_admin_token_file_of_its_engine_section(tmp_path, monkeypatch):
    """engine.admin_token_file reaches the engine; unset: $LORASYNC_ADMIN_TOKEN, else none
    (the engine then sends the token)."""
    from pathlib import Path

    from lorasync.backend import open as engines_open

    root = Path(__file__).resolve().parents[3]
    seen = []

    def open_engine(*args, **kwargs):
        seen.append((kwargs["token"], kwargs["admin_token"]))
        raise ValueError("stopped")  # the CLI reports it and returns 2

    monkeypatch.setattr(engines_open, "open_engine", open_engine)
    monkeypatch.setenv(TOKEN_ENV, "tok")
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    admin = write(tmp_path, "admin", "adm\n")
    args = ["train", "--config", str(root / "configs/digits.yaml"), f"model.base={tmp_path}",
            f"data.path={root / 'configs/digits_prompts.jsonl'}", "engine.kind=server",
            "engine.servers=[http://127.0.0.1:1]", "sync.strategy=factors"]
    assert cli.main([*args, f"engine.admin_token_file={admin}"]) == 2
    assert cli.main(args) == 2
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "adm-env")
    assert cli.main(args) == 2
    assert cli.main([*args, "engine.admin_token_file=/no/such/file"]) == 2  # refused before the engine
    assert seen == [("tok", "adm"), ("tok", None), ("tok", "adm-env")]
