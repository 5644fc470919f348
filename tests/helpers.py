"""Test helpers, in one place: the CLI and `lorasync serve` as subprocesses, trainer policies,
stand-ins for an optimizer step, and engines that record (`Tap`, `MemoryReceiver`).

Imported as `from tests.helpers import ...` by every test package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorasync.served_model import DTYPES, checkpoint_layout, weight_groups
from lorasync.server import TOKEN_ENV
from lorasync.server.serve.launch import free_port, wait_healthy
from lorasync.sync.policy import AdapterSpec, attach_random_adapter, randomize_trainable

TOKEN = "test-token-5f1c"
# How the tests start servers: float32 for 1e-4 parity, eager (torch.compile costs ~35 s on CPU).
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager")

# vLLM's packed_modules_mapping for the tiny llama, qwen2 and qwen3 (gpt2 fuses nothing).
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

# Every LoRA variant PEFT offers: (tiny model, LoraConfig arguments). Token ids 3, 5 and 7 are
# the trained rows of the trainable-token variants (`TRAINED_TOKENS`).
TRAINED_TOKENS = [3, 5, 7]
VARIANTS = {
    "plain": ("llama", dict(target_modules="all-linear")),
    "rslora": ("llama", dict(target_modules="all-linear", use_rslora=True)),
    "dora": ("llama", dict(target_modules=["q_proj", "down_proj"], use_dora=True)),
    "lora-bias": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    "fan-in-fan-out": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "embedding-lora": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "modules-to-save": ("llama", dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "trainable-tokens": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=TRAINED_TOKENS)),
    "tied-trainable-tokens": (
        "qwen2-tied", dict(target_modules=["q_proj"], trainable_token_indices=TRAINED_TOKENS)
    ),
}


# --- subprocesses: the CLI and servers, as a user runs them ---------------------------------


def run_lorasync(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 600, cwd: str | Path | None = None
) -> subprocess.CompletedProcess:
    """`lorasync ARGS...` (as `python -m lorasync`), output captured as text; `env` is added to
    this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "lorasync", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env=os.environ | dict(env or {}),
    )


class Server:
    """`lorasync serve` as a user runs it, in its own process group so it can be killed whole.

    `Server(model_dir).start().wait()`; `kill()` ends it, `start()` again restarts it on the
    same port. vLLM's log goes to `self.log`, whose tail a failed start reports.
    """

    def __init__(self, model_dir: str, vllm_args: Sequence[str] = SERVER_ARGS, token: str = TOKEN) -> None:
        self.model_dir = str(model_dir)
        self.vllm_args = tuple(vllm_args)
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = Path(f"{self.model_dir}-server-{self.port}.log")

    def start(self) -> Server:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lorasync", "serve", "--model", self.model_dir,
                 "--port", str(self.port), *self.vllm_args],
                env=os.environ | {TOKEN_ENV: self.token, "VLLM_CPU_KVCACHE_SPACE": "1",
                                  "VLLM_LOGGING_LEVEL": "WARNING"},
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )
        return self

    def wait(self, timeout: float = 300) -> Server:
        try:
            wait_healthy(self.url, self.process, timeout=timeout)
        except (RuntimeError, TimeoutError) as err:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{err}; the end of its log ({self.log}):\n{tail}") from None
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this test started
            self.process.wait(timeout=60)


@contextmanager
def running_servers(model_dir: str | Path, n: int = 2) -> Iterator[list[Server]]:
    """`n` `lorasync serve` servers of one model, started in parallel, killed at the end."""
    started = [Server(model_dir).start() for _ in range(n)]
    try:
        yield [s.wait() for s in started]
    finally:
        for s in started:
            s.kill()


def alive(servers: list[Server]) -> list[Server]:
    """The servers, each up: one an earlier test killed is started again."""
    for server in servers:
        if server.process.poll() is not None:
            server.start().wait()
    return servers


def lora_module_scores(base: str | Path, adapter: str | Path, probes: Sequence[Sequence[int]]) -> list[list[float]]:
    """`openai_scores` of a saved adapter as vLLM's own OpenAI server serves it, started with
    `--enable-lora --lora-modules policy=ADAPTER` (not lorasync's: a plain PEFT adapter)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
         "--dtype", "float32", "--enable-lora", "--lora-modules", f"policy={adapter}",
         "--max-lora-rank", "16", "--max-model-len", "512", "--enforce-eager",
         "--host", "127.0.0.1", "--port", str(port)],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url, server, timeout=240)
        return openai_scores(url, probes, token="unused", model="policy")
    finally:
        server.terminate()
        server.wait(timeout=60)


def openai_scores(
    url: str, probes: Sequence[Sequence[int]], token: str = TOKEN, model: str | None = None
) -> list[list[float]]:
    """Logprob of each token of each probe given its prefix, through the official openai
    client (echo=True completions): what any user of the server sees. `model`: the served
    model or adapter name (default: the first the server lists)."""
    from openai import OpenAI

    with OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0) as client:
        model = model or client.models.list().data[0].id
        out = []
        for seq in probes:
            r = client.completions.create(
                model=model, prompt=list(seq), echo=True, logprobs=0, max_tokens=1
            )
            out.append(r.choices[0].logprobs.token_logprobs[1 : len(seq)])
    return out


def max_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """The largest absolute difference of two lists of per-token logprobs (same shapes)."""
    assert [len(s) for s in a] == [len(t) for t in b]
    return max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s, t))


# --- trainer policies -----------------------------------------------------------------------


def policy(model_dir: str, dtype: str = "float32", **spec) -> PeftModel:
    """The base model in `model_dir` with a random LoRA adapter described by `spec`
    (`AdapterSpec` fields: targets, rank, modules_to_save, adapter_name, seed, ...)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return attach_random_adapter(base, AdapterSpec(**spec))


def peft_model(model_dir: str, config: dict, adapter: str = "pol", extra_adapter: bool = False) -> PeftModel:
    """A float32 policy with LoraConfig(r=4, **config) (a `VARIANTS` entry), randomized; with
    `extra_adapter` a second, inactive adapter that must not leak into the served weights."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, **config), adapter_name=adapter)
    if extra_adapter:
        model.add_adapter("other", LoraConfig(r=4, **config))
        model.set_adapter(adapter)
        model.base_model.set_adapter(adapter)
    randomize_trainable(model, seed=0, std=0.05)
    for name, param in model.named_parameters():  # add_adapter trains both; only one is active
        if ".other" in name:
            param.requires_grad_(False)
    return model


def mixed_precision_policy(model_dir: str) -> PeftModel:
    """A bfloat16 base with float32 LoRA factors (lora_B random: the adapter changes the
    policy), as mixed-precision training holds them; every sync sends in the engine's dtype."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
    return model


def train_step(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Stand-in for one optimizer step: move every trainable tensor (the adapter) by seeded noise."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn_like(param))


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what `train_step` moves (the adapter): one policy version, to load back with
    `load_trainable` when checking which version generated what."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# --- a GRPO trainer on the demo's task ---------------------------------------------------------


def demo_trainer_config(base: str | Path, out: str | Path, steps: int = 3, **changes):
    """The tiny demo's run settings (`commands.demo.demo_config`: the digits task, its prompts,
    rank-16 LoRA) for the model in `base`, writing to `out`, for `steps` steps. `changes` sets
    fields: a section's as a dict (`optim={"lr": 1e-2}`, `rollout={"mode": "async"}`), a
    top-level one as a value (`save_every=2`). The result is validated as a user's config is
    (each changed section and the whole rebuilt), so a test cannot run settings `train` refuses."""
    import dataclasses

    from lorasync.recipes.demo import demo_config

    config = demo_config(Path(out), steps=steps)
    config.model.base = str(base)
    for name, value in changes.items():
        if isinstance(value, dict):
            value = dataclasses.replace(getattr(config, name), **value)
        setattr(config, name, value)
    return dataclasses.replace(config)


def demo_trainer(base: str | Path, out: str | Path, engine, steps: int = 3, **changes):
    """A `GRPOTrainer` on `engine` with `demo_trainer_config(base, out, steps, **changes)`."""
    from lorasync.train.trainer import GRPOTrainer

    return GRPOTrainer(demo_trainer_config(base, out, steps, **changes), engine)


# --- engines that record ----------------------------------------------------------------------


class Tap:
    """A real engine whose incoming weight stream passes through `transform` first.

    `transform(stream)` returns the stream the engine gets: tests use it to record, corrupt
    or break a sync on its way into real vLLM. Everything else is the engine's.
    """

    def __init__(self, engine, transform: Callable[[Iterable], Iterable]) -> None:
        self.engine = engine
        self.transform = transform

    dtype = property(lambda self: self.engine.dtype)
    vocab_size = property(lambda self: self.engine.vocab_size)
    weight_version = property(lambda self: self.engine.weight_version)
    shared = property(lambda self: self.engine.shared)

    def checkpoint_layout(self):
        return self.engine.checkpoint_layout()

    def weight_groups(self):
        return self.engine.weight_groups()

    def load_weights(self, weights):
        return self.engine.load_weights(self.transform(weights))

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def score(self, sequences):
        return self.engine.score(sequences)


class MemoryReceiver:
    """An in-memory `WeightReceiver` for a tiny model folder: no vLLM, it keeps what it gets.

    It holds the engine's side of the contract strictly: every tensor must name a checkpoint
    tensor, have its shape and the receiver's dtype, and each load must complete every fused
    group it touches (vLLM's in-place reload needs whole groups); anything else raises
    ValueError. It copies what it keeps, as the contract asks.

    - `received`: the names of each load, in order; `loads`: how many loads;
    - `tensors`: the latest value received per name; `served()`: checkpoint values with
      those on top, what a real engine would serve.
    """

    shared = False  # as a colocated engine: each rank has its own (`base.Engine`)

    def __init__(self, model_dir: str | Path, dtype: str = "float32",
                 packed: Mapping[str, Sequence[str]] | None = None) -> None:
        self.model_dir = Path(model_dir)
        config = json.loads((self.model_dir / "config.json").read_text())
        if packed is None:
            packed = {} if config["model_type"] == "gpt2" else PACKED
        self.dtype: torch.dtype = DTYPES[dtype]
        self.vocab_size: int = config["vocab_size"]
        self.weight_version = 0
        self._layout = checkpoint_layout(model_dir)
        self._groups = weight_groups(self._layout, packed)
        self.received: list[list[str]] = []
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def loads(self) -> int:
        return len(self.received)

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]:
        return self._layout

    def weight_groups(self) -> list[list[str]]:
        return self._groups

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        names, got = [], {}
        for name, tensor in weights:
            if name not in self._layout:
                raise ValueError(f"{name}: not a tensor of the checkpoint")
            if tuple(tensor.shape) != self._layout[name] or tensor.dtype != self.dtype:
                raise ValueError(
                    f"{name}: {tuple(tensor.shape)} {tensor.dtype}, the engine holds "
                    f"{self._layout[name]} {self.dtype}"
                )
            names.append(name)
            got[name] = tensor.detach().clone()  # a MergedWeight is merged here, once
        partial = [g for g in self._groups if set(g) & set(names) and not set(g) <= set(names)]
        if partial:
            raise ValueError(f"partial fused group {partial[0]}: got only {sorted(set(partial[0]) & set(names))}")
        self.received.append(names)
        self.tensors.update(got)
        self.weight_version += 1
        return self.weight_version

    def served(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor as this engine would serve it now, in its dtype."""
        values = {}
        for path in sorted(self.model_dir.glob("*.safetensors")):
            values |= {k: v.to(self.dtype) for k, v in load_file(path).items()}
        return values | self.tensors


# --- raw transfers: a sync's bytes, to corrupt --------------------------------------------------


class _Recorder:
    """A socket stand-in that keeps what is sent (a real pair would block on a full buffer)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, chunk) -> None:
        self.data += bytes(chunk)


def transfer_bytes(records: Sequence, compress: bool = False) -> bytes:
    """The bytes `wire.send_payload` writes for `records` (`sync.base.Record`s): one valid
    transfer, as a client sends it after a server connects back, to mutate in tests."""
    from lorasync.server.transports.wire import send_payload

    recorder = _Recorder()
    sent = send_payload(recorder, list(records), compress)
    assert sent == len(recorder.data)  # it reports what it wrote
    return bytes(recorder.data)


def roundtrip(raw: bytes, layout: dict, max_bytes: int = 1 << 20, dtype: torch.dtype = torch.float32,
              seconds: float = 10.0):
    """Feed `raw` to the receiver (`wire.recv_payload`) through a real socket pair, under a
    deadline of `seconds`; return what it accepted."""
    import socket
    import threading

    from lorasync.server.transports.wire import Deadline, recv_payload

    a, b = socket.socketpair()

    def write() -> None:
        try:
            a.sendall(raw)
            a.shutdown(socket.SHUT_WR)
        except OSError:  # the receiver refused early and closed its end
            pass

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return recv_payload(b, layout, dtype, max_bytes, Deadline(seconds, DEADLINE_FIX))
    finally:
        b.close()  # first: a writer blocked on a full buffer gets an error and ends
        writer.join()
        a.close()


DEADLINE_FIX = "set LORASYNC_TRANSFER_TIMEOUT"  # what `roundtrip`'s Deadline tells to do


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare bit for bit (torch.equal takes -0.0 for 0.0 and NaN for
    nothing)."""
    return t.contiguous().reshape(-1).view(torch.uint8)  # flat: a 0-d tensor has no byte view


# --- data-parallel runs: ranks as processes, an engine that replays fixed generations ----------


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple) -> None:
    """One rank: the environment torchrun would give it, then `fn(rank, *args)`."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    fn(rank, *args)


def run_ranks(fn: Callable, world: int, *args, timeout: float = 300) -> list[int]:
    """Run `fn(rank, *args)` in `world` spawned processes as the ranks of one process group
    (torchrun's environment variables), and return their exit codes in rank order. A run
    past `timeout` seconds is killed and raises TimeoutError: a hang never hangs the tests.
    `fn` must be importable (a module-level function)."""
    import multiprocessing
    import time

    context = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(fn, r, world, port, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            raise TimeoutError(f"{world} ranks still running after {timeout} s")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(30)
    return [p.exitcode for p in procs]


class ReplayEngine(MemoryReceiver):
    """A `MemoryReceiver` that generates fixed completions: each prompt's are a function of
    its token ids alone (not of the seed, the step or the rank that asks), so one rank with
    the whole batch and N ranks with a share each train on the same generations, and sampling
    never enters a comparison. The text shows about two digits in three tokens, so the demo's
    reward (the share of digits) varies within a group."""

    def generate(self, prompts, max_tokens, temperature=1.0, n=1, seed=None):
        from lorasync.sync.base import Completion

        out = []
        for ids in prompts:
            gen = torch.Generator().manual_seed(hash(tuple(ids)) % (2**31))
            lengths = torch.randint(max(1, max_tokens // 2), max_tokens + 1, (n,), generator=gen).tolist()
            group = []
            for length in lengths:
                tokens = torch.randint(10, 100, (length,), generator=gen).tolist()
                text = "".join("7" if t % 3 else "x" for t in tokens)
                group.append(Completion(tokens, text, [-1.0] * length))
            out.append(group)
        return out


def kill_at_stop(script: str, args: Sequence[str], log: Path, timeout: float = 120) -> str:
    """Run `python -c script *args` (a client dying on purpose, the servers' token in its
    environment) until it prints its first line, saying where it stopped, then SIGKILL it;
    return that line. Its stderr goes to `log`; `timeout` bounds the wait for the line."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=os.environ | {TOKEN_ENV: TOKEN},
        )
    watchdog = threading.Timer(timeout, proc.kill)  # bounds the readline below
    watchdog.start()
    try:
        return proc.stdout.readline()
    finally:
        watchdog.cancel()
        proc.kill()  # SIGKILL
        proc.wait(timeout=60)


async def read_body(receive) -> bytes:
    """The whole body of an ASGI request, from its `receive` channel."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
