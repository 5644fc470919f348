"""Server mode, trainer side: sync LoRA factors into separately running vLLM OpenAI servers.

`ServerEngine` has the interface of `ColocatedEngine` (dtype, checkpoint_layout,
weight_groups, load_weights, generate, score) over one or more servers started by
`lorasync serve` (or any vLLM server with lorasync installed, the `lorasync` weight-transfer
backend selected and `TokenGuard` as middleware). Generation and scoring use the
OpenAI-compatible API; weights move through vLLM's own weight-transfer routes, with the bytes
on a TCP stream the server opens back to this process (`transfer.py`), or, on GPU machines,
NCCL broadcasts from the trainer's GPU to the servers' (`nccl_transfer.py`).

`FactorSync` is the sync that makes server mode cheap: per adapted module it sends the LoRA
factors B, A and the scale (about 1-2% of the merged tensors), plus modules_to_save tensors;
the server merges them into its pristine base weights. A sync is atomic from outside and all
or none over the servers: every server is paused (in-flight requests finish first) and
receives the payload, and only then does each load it, take the new weight version, reset its
prefix cache and resume; a transfer that fails anywhere leaves every server serving the
previous version (`load_records`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch
from peft import PeftModel

from lorasync.engine import DTYPES, Completion
from lorasync.merge import Merger
from lorasync.plan import Source, SyncPlan, plan_sync
from lorasync.sync import SyncReport
from lorasync.nccl_transfer import open_trainer, rendezvous, send_records, wait_sent
from lorasync.transfer import (
    MAGIC,
    NONCE_BYTES,
    PayloadError,
    Record,
    check_payload,
    manifest,
    recv_exact,
    send_payload,
)

BACKEND = "lorasync"
TOKEN_ENV = "LORASYNC_TOKEN"
MIDDLEWARE = "lorasync.receiver.TokenGuard"
TRANSPORTS = ("tcp", "nccl")


class ServerSyncError(RuntimeError):
    """A server did not take a sync; it still serves its previous weight version."""


@dataclass
class _Server:
    url: str
    layout: dict[str, tuple[int, ...]]
    groups: list[list[str]]
    dtype: str
    vocab_size: int
    model: str
    max_payload_bytes: int
    workers: int  # vLLM workers of the server (tensor x pipeline parallel): NCCL ranks 1..n
    group: object = None  # the NCCL communicator with them, for transport="nccl"


class ServerEngine:
    """One or more vLLM OpenAI servers seen as one engine: syncs go to all, generation is spread.

    `urls` are the servers' base URLs (http://127.0.0.1:8000); `token` is what they were
    started with (default: $LORASYNC_TOKEN). `timeout` bounds every request and transfer step,
    so a server that dies mid-sync raises ServerSyncError within that time. `callback_host` is
    the address of this process as the servers see it: they connect back to it for the bytes.
    `compress` sends each tensor's top byte plane Huffman-coded (lossless; a third fewer bytes
    for bf16 factors, ~0.09 s more CPU per sync on the 0.5B shape, where a sync takes ~1 s):
    on by default, since the link is what server mode pays for; off for loopback, if you like.
    `transport="nccl"` moves the bytes by NCCL broadcast from this process's current CUDA
    device to the servers' GPU workers instead of TCP (raw tensors: `compress` is for TCP).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        timeout: float = 60.0,
        callback_host: str = "127.0.0.1",
        compress: bool = True,
        transport: str = "tcp",
    ) -> None:
        from openai import OpenAI

        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if transport == "nccl" and not torch.cuda.is_available():
            raise ValueError(
                "transport='nccl' sends from a CUDA GPU and this process has none; use "
                "transport='tcp' (the default), which needs no accelerator"
            )
        self.transport = transport
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("ServerEngine needs at least one server URL")
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise ValueError(
                f"no token for the servers: pass token=... (CLI: --token) or set {TOKEN_ENV} "
                "to the token the servers were started with"
            )
        self.timeout = timeout
        self.callback_host = callback_host
        self.compress = compress
        self.weight_version = 0
        self.last_wire_bytes = 0
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        self._servers = [self._connect(url) for url in self.urls]
        first = self._servers[0]
        for other in self._servers[1:]:
            if (other.layout, other.dtype) != (first.layout, first.dtype):
                raise ValueError(
                    f"servers {first.url} and {other.url} serve different models or dtypes "
                    f"({first.dtype} vs {other.dtype}): start every server from the same "
                    "model folder and --dtype"
                )
        # Versions continue from what the servers serve, so a new client (a resumed trainer)
        # never announces a version a server already reported for other weights.
        served = [int(v) for v in self.served_versions() if v.isdigit()]
        self.weight_version = max(served, default=0)
        if transport == "nccl":
            self._nccl_stream = torch.cuda.Stream()
            for server in self._servers:
                self._join_nccl(server)
        self.dtype: torch.dtype = DTYPES[first.dtype]
        self.vocab_size = first.vocab_size
        self._clients = [
            OpenAI(base_url=f"{s.url}/v1", api_key=token, timeout=timeout, max_retries=0)
            for s in self._servers
        ]

    # -- the engine interface ---------------------------------------------------------------

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]:
        """The checkpoint names and shapes the servers' model was built from."""
        return self._servers[0].layout

    def weight_groups(self) -> list[list[str]]:
        """Checkpoint names the servers load into one vLLM parameter set (sent together)."""
        return self._servers[0].groups

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load merged checkpoint-format tensors into every server; return the new version.

        Whole tensors: what `WeightSync` sends. `FactorSync` sends factors through
        `load_records` instead, at a fraction of the bytes.
        """
        return self.load_records([Record(name, (t,)) for name, t in weights])

    def load_records(self, records: Sequence[Record]) -> int:
        """Send one transfer to every server, all or none; return the new weight version.

        Two phases. Every server is paused (requests in flight finish first) and receives
        and checks the whole payload, loading nothing; only when all have it does each load
        it. If a transfer fails, the servers that received theirs discard it, the rest are
        not touched, and all keep serving the previous version: ServerSyncError says which
        server failed and why. The one window left is a server dying while loading, after
        every transfer succeeded: the others then serve the new version (the error names it).
        """
        version = self.weight_version + 1
        paused: list[_Server] = []
        failed = True
        try:
            wire, received = 0, []
            try:
                for server in self._servers:
                    self._call(server.url, "POST", "/pause", True, params={"mode": "wait", "clear_cache": "true"})
                    paused.append(server)
                    wire = self._receive(server, list(records))
                    received.append(server)
            except ServerSyncError:
                for other in received:
                    self._discard(other)
                raise
            errors = []
            for server in self._servers:
                try:
                    self._call(server.url, "POST", "/finish_weight_update", json={"weight_version": str(version)})
                    self._call(server.url, "POST", "/reset_prefix_cache")
                except ServerSyncError as err:
                    errors.append(f"{err} (loading failed after every server received the payload)")
            if errors:
                # the others serve this version now: the next sync must not reuse its number
                self.weight_version = version
                raise ServerSyncError("; ".join(errors))
            failed = False
        finally:
            for server in paused:
                try:
                    self._call(server.url, "POST", "/resume", retry=True)
                except ServerSyncError:
                    if not failed:
                        raise
                    # else a dead server: the error that matters is already on its way
        self.weight_version = version
        self.last_wire_bytes = wire
        return version

    def served_versions(self) -> list[str]:
        """The weight version each server reports serving (GET /weight_info)."""
        return [
            self._call(s.url, "GET", "/weight_info", retry=True).json()["weight_version"]
            for s in self._servers
        ]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """Sample `n` completions per prompt, prompts spread round-robin over the servers."""

        def run(i: int, batch: list[list[int]]) -> list[list[Completion]]:
            out = self._clients[i].completions.create(
                model=self._servers[i].model, prompt=batch, max_tokens=max_tokens,
                temperature=temperature, n=n, seed=seed, logprobs=0,
                extra_body={"return_token_ids": True},
            )
            choices = sorted(out.choices, key=lambda c: c.index)
            return [
                [
                    Completion(
                        token_ids=list(c.token_ids),
                        text=c.text,
                        logprobs=list(c.logprobs.token_logprobs),
                    )
                    for c in choices[p * n : (p + 1) * n]
                ]
                for p in range(len(batch))
            ]

        return self._spread(prompts, run)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (tokens 1..n-1), spread over the servers."""
        return self._spread(sequences, self.score_on)

    def score_on(self, index: int, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Like `score`, on server `index` only: echo=True completions of the sequences."""
        out = self._clients[index].completions.create(
            model=self._servers[index].model, prompt=[list(s) for s in sequences], echo=True,
            logprobs=0, max_tokens=1, temperature=1.0,
            # token ids instead of echoed text: no detokenizing of the prompt, which fails
            # for ids the tokenizer lacks (random models of a real shape have a small one)
            extra_body={"return_token_ids": True},
        )
        choices = sorted(out.choices, key=lambda c: c.index)
        return [c.logprobs.token_logprobs[1 : len(s)] for c, s in zip(choices, sequences)]

    def close(self) -> None:
        """Close the HTTP connections and NCCL groups; the servers keep running."""
        for server in self._servers:
            if server.group is not None:
                server.group.destroy()
                server.group = None
        self._http.close()
        for client in self._clients:
            client.close()

    # -- internals --------------------------------------------------------------------------

    def _spread(self, items: Sequence[Sequence[int]], run) -> list:
        """Split `items` round-robin over the servers, run batches in parallel, keep order."""
        k = len(self._servers)
        batches = [(i, [list(items[j]) for j in range(i, len(items), k)]) for i in range(k)]
        batches = [(i, b) for i, b in batches if b]
        with ThreadPoolExecutor(len(batches) or 1) as pool:
            results = list(pool.map(lambda ib: run(*ib), batches))
        out: list = [None] * len(items)
        for (i, _), result in zip(batches, results):
            out[i::k] = result
        return out

    def _call(
        self, url: str, method: str, path: str, retry: bool = False, **kwargs
    ) -> httpx.Response:
        """One control request; any failure becomes a ServerSyncError that says what to do.

        `retry`: once more on a connection error, for requests safe to repeat (resume, pause).
        After answering a route with an error the server drops the keep-alive connection, and
        the next request on it is reset: without this a failed sync could leave it paused.
        """
        try:
            try:
                response = self._http.request(method, url + path, **kwargs)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                if not retry:
                    raise
                response = self._http.request(method, url + path, **kwargs)
        except httpx.HTTPError as err:
            raise ServerSyncError(
                f"{url}{path}: {type(err).__name__}: {err or 'no answer'} (within "
                f"{self.timeout:.0f} s). Is the server running? Restart it and sync again: a "
                "restarted server starts from the base weights and takes the next sync"
            ) from None
        if response.status_code != 200:
            raise ServerSyncError(f"{url}{path} answered {response.status_code}: {response.text[:500]}")
        return response

    def _with_callback(self, url: str, path: str, field: str, talk) -> object:
        """POST `path` naming a one-shot listener; run `talk(sock)` on the server's connection.

        The request blocks until the server is done with the stream, so it runs on a thread
        while this one serves the connection. The server must open it and prove the nonce.
        """
        nonce = secrets.token_bytes(NONCE_BYTES)
        listener = socket.create_server((self.callback_host, 0))
        listener.settimeout(0.2)
        endpoint = {"host": self.callback_host, "port": listener.getsockname()[1], "nonce": nonce.hex()}
        answer: dict = {}

        def post() -> None:
            try:
                answer["response"] = self._call(url, "POST", path, json={field: endpoint})
            except ServerSyncError as err:
                answer["error"] = err

        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        try:
            with listener:
                sock = self._accept(listener, thread)
            if sock is None:
                thread.join(self.timeout)
                raise answer.get("error") or ServerSyncError(
                    f"{url}{path}: the server did not connect back to "
                    f"{self.callback_host} within {self.timeout:.0f} s"
                )
            with sock:
                sock.settimeout(self.timeout)
                hello = recv_exact(sock, len(MAGIC) + NONCE_BYTES, "hello")
                if not secrets.compare_digest(bytes(hello), MAGIC + nonce):
                    raise ServerSyncError(f"{url}: a connection without the transfer's nonce")
                result = talk(sock)
                sock.shutdown(socket.SHUT_WR)
        except (OSError, PayloadError) as err:  # PayloadError: the stream ended early
            # The server may have refused the payload and closed the stream: wait for its
            # answer (bounded), which says why, and so that nothing else overlaps the request.
            thread.join(self.timeout)
            if "error" in answer:
                raise answer["error"] from None
            raise ServerSyncError(
                f"{url}{path}: transfer broke ({type(err).__name__}: {err}); the server keeps "
                "its previous weights. Is it still running? Restart it and sync again"
            ) from None
        thread.join(self.timeout + 5)
        if thread.is_alive():
            raise ServerSyncError(f"{url}{path}: no answer within {self.timeout:.0f} s")
        if "error" in answer:
            raise answer["error"]
        return result

    def _accept(self, listener: socket.socket, request: threading.Thread) -> socket.socket | None:
        """The server's connection, or None if the request ended first or time ran out."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                return listener.accept()[0]
            except TimeoutError:
                if not request.is_alive():  # refused (401, 4xx, 5xx) without connecting
                    return None
        return None

    def _connect(self, url: str) -> _Server:
        """Handshake: the server reports its checkpoint layout, fused groups, dtype, vocab."""

        def read_info(sock: socket.socket) -> dict:
            (length,) = struct.unpack("<Q", recv_exact(sock, 8, "server info length"))
            return json.loads(bytes(recv_exact(sock, length, "server info")))

        info = self._with_callback(url, "/init_weight_transfer_engine", "init_info", read_info)
        model = self._call(url, "GET", "/v1/models").json()["data"][0]["id"]
        return _Server(
            url=url,
            layout={k: tuple(v) for k, v in info["layout"].items()},
            groups=info["groups"],
            dtype=info["dtype"],
            vocab_size=info["vocab_size"],
            model=model,
            max_payload_bytes=info["max_payload_bytes"],
            workers=info["workers"],
        )

    def _join_nccl(self, server: _Server) -> None:
        """Open an NCCL group with one server's workers, this process being rank 0. Both
        sides block in the rendezvous, so the server is asked to join from a thread."""
        with socket.socket() as probe:  # a free port for the rendezvous store
            probe.bind((self.callback_host, 0))
            port = probe.getsockname()[1]
        meeting = rendezvous(self.callback_host, port, server.workers)
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(
                self._call, server.url, "POST", "/init_weight_transfer_engine",
                json={"init_info": {"nccl": meeting}},
            )
            server.group = open_trainer(meeting)
            request.result()

    def _receive(self, server: _Server, records: list[Record]) -> int:
        """Open an update session on a paused server and transfer `records` (checked there,
        not loaded); return the bytes on the wire. On failure the session is closed."""
        url = server.url
        try:
            self._call(url, "POST", "/start_weight_update")
        except ServerSyncError as err:
            if "already active" not in str(err):
                raise
            # A client died between the two phases of a sync and left its session open (and
            # its payload unloaded): drop that payload and start afresh.
            self._discard(server)
            self._call(url, "POST", "/start_weight_update")
        try:
            if self.transport == "nccl":
                return self._send_nccl(server, records)
            return self._with_callback(
                url, "/update_weights", "update_info", lambda s: send_payload(s, records, self.compress)
            )
        except ServerSyncError:
            # The worker closes its update session when the transfer fails on its side. When
            # the failure was on this side (a timeout, say) the session may still be open and
            # hold the whole payload, which a bare finish would load: drop it first.
            self._discard(server)
            raise

    def _send_nccl(self, server: _Server, records: list[Record]) -> int:
        """The manifest inline in `/update_weights`, the tensors by NCCL broadcast beside it
        (the request returns once the server has them all); return the bytes moved."""
        if server.group is None:
            raise ServerSyncError(
                f"{server.url}: the NCCL group with this server was lost in an earlier failed "
                "transfer; make a new ServerEngine to sync again"
            )
        head = manifest(records)
        try:  # the server checks it too, but a refusal there would leave the broadcasts hanging
            check_payload(head, server.layout, DTYPES[server.dtype], server.max_payload_bytes)
        except PayloadError as err:
            raise ServerSyncError(f"{server.url}: not sent, the server would refuse it: {err}") from None
        answer: dict = {}

        def post() -> None:
            try:
                self._call(server.url, "POST", "/update_weights", json={"update_info": {"manifest": head}})
            except ServerSyncError as err:
                answer["error"] = err

        request = threading.Thread(target=post, daemon=True)
        request.start()
        device = torch.device("cuda", torch.cuda.current_device())
        sent = send_records(server.group, records, device, self._nccl_stream)
        try:
            wait_sent(self._nccl_stream, request, lambda: "error" in answer, self.timeout)
        except PayloadError as err:
            # Abandoned, not destroyed: destroying a communicator with a broadcast pending
            # blocks. Its stream is this engine's own, so the trainer's work is not held up.
            server.group = None
            raise answer.get("error") or ServerSyncError(f"{server.url}: {err}") from None
        request.join(self.timeout)
        if request.is_alive():
            raise ServerSyncError(f"{server.url}/update_weights: no answer within {self.timeout:.0f} s")
        if "error" in answer:
            raise answer["error"]
        return len(json.dumps(head)) + sum(t.numel() * t.element_size() for t in sent)

    def _discard(self, server: _Server) -> None:
        """Drop the payload a server received, and close its session: nothing loads."""
        try:
            # retry: after an error answer the server drops the connection (see `_call`)
            self._call(server.url, "POST", "/update_weights", retry=True, json={"update_info": {"discard": True}})
            self._call(server.url, "POST", "/finish_weight_update", retry=True, json={})
        except ServerSyncError:
            pass  # it is failing too; the error that matters is already on its way


def lora_records(model: PeftModel, plan: SyncPlan, dtype: torch.dtype) -> Iterable[Record]:
    """What one server sync sends for `plan.changed`: factors where possible, else tensors.

    Plain LoRA on a linear layer becomes (B, A, scale) in the checkpoint tensor's orientation
    (GPT-2's Conv1D stores W as (in, out), so its factors go transposed and swapped).
    modules_to_save copies, trainable tokens, LoRA biases and variants with their own merge
    (DoRA) go as merged tensors. Frozen base tensors that only complete a fused group are not
    sent at all: the server has them.
    """
    merger = Merger(model, plan.adapter_name)
    for entry in plan.changed:
        if entry.source is Source.PARAM and "modules_to_save" not in entry.path.split("."):
            continue
        factors = merger.factors(entry)
        if factors is not None:
            b, a, scale = factors
            yield Record(entry.checkpoint, (b.to(dtype), a.to(dtype)), scale)
        else:
            yield Record(entry.checkpoint, (merger(entry).to(dtype),))


class FactorSync:
    """Syncs a PeftModel into a ServerEngine by LoRA factors; the plan is computed once.

    Same use as `WeightSync`: `report = sync()` after every optimizer step. `bytes_sent` is
    the tensor bytes; `engine.last_wire_bytes` adds the manifest (bytes on the wire).
    """

    strategy = "lora-factors"

    def __init__(self, model: PeftModel, engine: ServerEngine) -> None:
        self.model = model
        self.engine = engine
        self.plan: SyncPlan = plan_sync(model, engine.checkpoint_layout(), engine.weight_groups())

    def __call__(self) -> SyncReport:
        start = time.perf_counter()
        with torch.no_grad():
            records = list(lora_records(self.model, self.plan, self.engine.dtype))
            version = self.engine.load_records(records)
        return SyncReport(
            strategy=self.strategy,
            tensors_sent=sum(len(r.tensors) for r in records),
            bytes_sent=sum(r.nbytes for r in records),
            seconds=time.perf_counter() - start,
            version=version,
        )


def serve_command(
    model: str, host: str = "127.0.0.1", port: int = 8000, extra: Sequence[str] = ()
) -> list[str]:
    """The vLLM OpenAI server command line `lorasync serve` runs."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", host, "--port", str(port),
        "--weight-transfer-config", f'{{"backend": "{BACKEND}"}}',
        "--middleware", MIDDLEWARE,
        *extra,
    ]


def serve_env(token: str) -> dict[str, str]:
    """The server's environment: dev mode for the update routes, the token for the guard."""
    if not token:
        raise ValueError(
            f"lorasync serve needs a token: pass --token or set {TOKEN_ENV}; every route but "
            "/health will require it (openai client: api_key=<token>)"
        )
    return os.environ | {"VLLM_SERVER_DEV_MODE": "1", TOKEN_ENV: token}


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


def run_server_sync_check(
    base: str,
    adapter: str,
    urls: Sequence[str],
    token: str | None = None,
    repeat: int = 1,
    tolerance: float | None = None,
) -> dict:
    """`sync-check --server`: sync an adapter into running servers by factors and verify.

    The trainer loads `base` + `adapter` in the servers' dtype; `result["ok"]` says whether
    every server's logprobs match the trainer's within `tolerance` (default per dtype).
    """
    from lorasync.adapters import load_policy
    from lorasync.verify import TOLERANCES, probe_sequences, verify

    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    engine = ServerEngine(urls, token)
    try:
        dtype = str(engine.dtype).removeprefix("torch.")
        tolerance = TOLERANCES.get(dtype, 1e-1) if tolerance is None else tolerance
        model = load_policy(base, adapter, dtype)
        sync = FactorSync(model, engine)
        reports = [sync() for _ in range(repeat)]
        probes = probe_sequences(engine.vocab_size)
        # Each server scores every probe: spreading would hide one server's stale weights.
        diffs = [verify(model, _Pinned(engine, i), probes) for i in range(len(engine.urls))]
        versions = engine.served_versions()
    finally:
        engine.close()
    last = reports[-1]
    worst = max(d.max_abs_diff for d in diffs)
    return {
        "ok": worst <= tolerance,
        "max_abs_logprob_diff": worst,
        "per_server_max_abs_logprob_diff": [d.max_abs_diff for d in diffs],
        "tolerance": tolerance,
        "dtype": dtype,
        "strategy": sync.strategy,
        "servers": list(engine.urls),
        "tensors_sent": last.tensors_sent,
        "bytes_sent": last.bytes_sent,
        "wire_bytes": engine.last_wire_bytes,
        "sync_seconds": last.seconds,
        "sync_seconds_all": [r.seconds for r in reports],
        "weight_version": last.version,
        "served_versions": versions,
    }


class _Pinned:
    """A scorer that asks one server of a ServerEngine only."""

    def __init__(self, engine: ServerEngine, index: int) -> None:
        self.engine, self.index = engine, index

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        return self.engine.score_on(self.index, sequences)
