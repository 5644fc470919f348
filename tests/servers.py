"""Real `lorasync serve` subprocesses on loopback, for the server-mode tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from lorasync.server import wait_healthy

TOKEN = "test-token-5f1c"
VLLM_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lorasync serve` as a user runs it, in its own process group so it can be killed whole."""

    def __init__(self, model_dir: str, vllm_args: tuple[str, ...] = VLLM_ARGS) -> None:
        self.model_dir = model_dir
        self.vllm_args = vllm_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.log = f"{model_dir}-server-{self.port}.log"  # vLLM's log, for a failing test

    def start(self) -> "Server":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lorasync.cli", "serve", "--model", self.model_dir,
             "--port", str(self.port), *self.vllm_args],
            env=os.environ | {"LORASYNC_TOKEN": TOKEN, "VLLM_CPU_KVCACHE_SPACE": "1",
                              "VLLM_LOGGING_LEVEL": "WARNING"},
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), start_new_session=True,
        )
        return self

    def wait(self) -> "Server":
        wait_healthy(self.url, self.process, timeout=300)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this test started
            self.process.wait(timeout=60)
