"""Starting servers: the command line `lorasync serve` runs, its environment, and waiting for it;
and where a command's tokens come from (`resolve_token`, `resolve_admin_token`).

Used by the CLI (`lorasync serve` replaces itself with the server), benchmarks and tests
(which start it as a subprocess).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from lorasync.engines import vllm_compat
from lorasync.server import ADMIN_TOKEN_ENV, BACKEND, TOKEN_ENV
from lorasync.server.serve.guard import CALLBACK_ANYWHERE_ENV, DEV_ROUTES_ENV, RUNTIME_LORA_ENV

# vLLM's switch for its runtime LoRA routes (/v1/load_lora_adapter: any adapter folder the
# server can read); `lorasync serve` drops an inherited one unless --allow-runtime-lora.
VLLM_RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"

MIDDLEWARE = "lorasync.server.serve.guard.TokenGuard"
# The pause lease (server/serve/lease.py). vLLM adds each --middleware in turn and Starlette makes
# the last added the outermost, so it goes before the guard: only what the guard lets in reaches it.
LEASE_MIDDLEWARE = "lorasync.server.serve.lease.PauseLease"
# What the deprecated `--token T` prints: why not, and the two ways instead.
TOKEN_FLAG_DEPRECATED = (
    "--token is deprecated: a token on the command line shows in `ps` and in the shell's "
    f"history; pass --token-file PATH (a file only you can read: chmod 600 PATH) or set "
    f"${TOKEN_ENV} instead"
)


def resolve_token(
    token_file: str | None = None, token: str | None = None, environ: Mapping[str, str] = os.environ
) -> tuple[str, list[str]]:
    """The token a command uses, and the warnings to print: `--token-file`'s, else the
    deprecated `--token`'s, else $LORASYNC_TOKEN ("" when there is none: the caller refuses).

    A flag wins over the environment, so a shell's exported default can be overridden.
    """
    if token_file is not None and token is not None:
        raise ValueError("pass the token one way: --token-file PATH or $LORASYNC_TOKEN, not --token too")
    if token_file is not None:
        return read_token_file(token_file)
    if token is not None:
        return token, [TOKEN_FLAG_DEPRECATED]
    return environ.get(TOKEN_ENV, ""), []


def resolve_admin_token(
    admin_token_file: str | None = None, environ: Mapping[str, str] = os.environ,
    flag: str = "--admin-token-file",
) -> tuple[str, list[str]]:
    """The admin token a command uses, and the warnings to print: `admin_token_file`'s (named
    `flag` in errors), else $LORASYNC_ADMIN_TOKEN ("" when there is none: the token is the
    admin token too)."""
    if admin_token_file is not None:
        return read_token_file(admin_token_file, flag)
    return environ.get(ADMIN_TOKEN_ENV, ""), []


def read_token_file(path: str, flag: str = "--token-file") -> tuple[str, list[str]]:
    """The token in the file `path` (surrounding whitespace stripped), and a warning when the
    file is open to its group or to others. Missing, unreadable, empty or several words: an
    error naming `flag`, the option that named the file."""
    file = Path(path).expanduser()
    make = (
        f'write it with `python -c "import secrets; print(secrets.token_hex(16))" > {path}` '
        f"and `chmod 600 {path}`"
    )
    try:
        text, mode = file.read_text(), file.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file; {make}") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ValueError(f"{flag} {path}: cannot read it ({reason}); pass a text file holding the token") from None
    token = text.strip()
    if not token:
        raise ValueError(f"{flag} {path} is empty: put the token in it, on one line ({make})")
    if any(c.isspace() for c in token):
        raise ValueError(
            f"{flag} {path} holds {len(token.split())} words: a token is one word "
            "(no spaces or line breaks); put the token alone in the file"
        )
    warnings = []
    if mode & 0o077:
        warnings.append(
            f"{flag} {path} is open to its group or to others (mode "
            f"{stat.S_IMODE(mode):04o}): run `chmod 600 {path}` so only you can read the token"
        )
    return token, warnings


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(
    model: str, host: str = "127.0.0.1", port: int = 8000, extra: Sequence[str] = ()
) -> list[str]:
    """The vLLM OpenAI server command line `lorasync serve` runs."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", host, "--port", str(port),
        "--weight-transfer-config", f'{{"backend": "{BACKEND}"}}',
        "--middleware", LEASE_MIDDLEWARE, "--middleware", MIDDLEWARE,  # the guard outermost
        *vllm_compat.scheduler_flags(),  # seeded sampling on CPU (see there)
        # the token route, whose answers carry per-token weight versions (server/client/tokens.py);
        # the guard opens only it of the scale-out routes
        "--enable-scale-out",
        *extra,
    ]


def serve_env(
    token: str, allow_dev_routes: bool = False, admin_token: str = "", allow_runtime_lora: bool = False,
    allow_callback_anywhere: bool = False,
) -> dict[str, str]:
    """The server's environment: dev mode for the update routes, the tokens for the guard
    (no `admin_token`: the token is the admin token too), and what the flags open: vLLM's
    other development routes (to the admin token), its runtime LoRA routes, callbacks to any
    address. An inherited environment opens none of them: only the flags do."""
    if not token:
        raise ValueError(
            f"lorasync serve needs a token: pass --token-file PATH or set {TOKEN_ENV}; every "
            "route but /health will require it (openai client: api_key=<token>)"
        )
    env = os.environ | {"VLLM_SERVER_DEV_MODE": "1", TOKEN_ENV: token}
    for name in (ADMIN_TOKEN_ENV, DEV_ROUTES_ENV, RUNTIME_LORA_ENV, VLLM_RUNTIME_LORA_ENV, CALLBACK_ANYWHERE_ENV):
        env.pop(name, None)  # only the flags set them, not an inherited environment
    flags = {
        ADMIN_TOKEN_ENV: admin_token, DEV_ROUTES_ENV: "1" if allow_dev_routes else "",
        RUNTIME_LORA_ENV: "1" if allow_runtime_lora else "",
        VLLM_RUNTIME_LORA_ENV: "1" if allow_runtime_lora else "",
        CALLBACK_ANYWHERE_ENV: "1" if allow_callback_anywhere else "",
    }
    return env | {name: value for name, value in flags.items() if value}


KV_CACHE_WARNING = (
    "no VLLM_CPU_KVCACHE_SPACE (GiB) or --kv-cache-memory-bytes: vLLM on CPU sizes its KV cache "
    "from the memory free at start, and a trainer on this machine may then run out "
    "(docs/server.md); set VLLM_CPU_KVCACHE_SPACE=4, say"
)


def unbounded_kv_cache(env: Mapping[str, str], vllm_args: Sequence[str]) -> bool:
    """Whether a server would start on CPU with vLLM's KV cache sized from the free memory."""
    if env.get("VLLM_CPU_KVCACHE_SPACE") or any(a.startswith("--kv-cache-memory-bytes") for a in vllm_args):
        return False
    import torch

    return not torch.cuda.is_available()  # on GPUs vLLM sizes it from GPU memory


def start_server(
    model: str, token: str, port: int, extra: Sequence[str] = (), host: str = "127.0.0.1",
    env_extra: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start the server `lorasync serve` runs as a subprocess (benchmarks); see `wait_healthy`.

    Its output goes to this process's stderr: stdout is the caller's (`--json` prints there).
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"} | serve_env(token) | dict(env_extra or {})
    return subprocess.Popen(serve_command(model, host, port, extra), env=env, stdout=sys.stderr)


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Block until GET {url}/health answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server at {url} did not answer /health within {timeout:.0f} s")
        time.sleep(1)
