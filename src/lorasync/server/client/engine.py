"""Server mode, trainer side: one or more `lorasync serve` servers seen as one engine.

`ServerEngine` has the colocated engine's interface (a `WeightReceiver`, `RecordReceiver`,
`Generator`, `Scorer` and `WeightReader`) over vLLM OpenAI servers started by `lorasync
serve` (or any vLLM server with lorasync installed, the `lorasync` weight-transfer backend
selected and `guard.TokenGuard` as middleware). Generation and scoring use the OpenAI-compatible API
(`completions.py`), or, when syncs land in flight, vLLM's token route (`tokens.py`), spread
over the servers; weights move through vLLM's own weight-transfer routes, the bytes by
a transport: TCP (`transports/tcp.py`) or, on GPU machines, NCCL (`transports/nccl.py`).

A sync is atomic from outside and all or none over the servers: every server is paused
(in-flight requests finish first, or with in_flight="keep" are frozen and labelled per token)
and receives the payload, and only then does each load it, take the new weight version, reset
its prefix cache and resume; a transfer that fails anywhere leaves every server serving the
previous version (`update.py`). The payload is read once and written to every server as it
is read, so a merged sync's tensors are held one at a time (`load_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from lorasync.served_model import DTYPES
from lorasync.server import ADMIN_TOKEN_ENV, TOKEN_ENV
from lorasync.server.client.completions import CompletionsClient
from lorasync.server.client.control import Control, ServerSyncError
from lorasync.server.client.tokens import TokenGenerator
from lorasync.server.transports.nccl import NcclTransport
from lorasync.server.transports.tcp import TcpTransport
from lorasync.server.client.update import PartlyLoaded, update
from lorasync.server.transports import Transport
from lorasync.sync.kinds import IN_FLIGHT
from lorasync.sync.base import Completion, Record, WeightStream, prompt_seed

TRANSPORTS = ("tcp", "nccl")
T = TypeVar("T")
I = TypeVar("I")


class ServerEngine:
    """One or more vLLM OpenAI servers seen as one engine: syncs go to all, generation is spread.

    `urls` are the servers' base URLs (http://127.0.0.1:8000); `token` is what they were
    started with (default: $LORASYNC_TOKEN): generation and scoring use it; `admin_token` their
    admin token (`lorasync serve --admin-token-file`; default: $LORASYNC_ADMIN_TOKEN, else
    `token`): the sync routes (pause, weight transfers) need it. `timeout` bounds every
    request and transfer step, so a server that dies mid-sync raises ServerSyncError within
    that time. `callback_host` is
    the address of this process as the servers see it: they connect back to it for the bytes.
    `compress` sends each tensor's top byte plane Huffman-coded (lossless; a third fewer bytes
    for bf16 factors, ~0.09 s more CPU per sync on the 0.5B shape, where a sync takes ~1 s):
    on by default, since the link is what server mode pays for; off for loopback, if you like.
    `transport="nccl"` moves the bytes by NCCL broadcast from this process's current CUDA
    device to the servers' GPU workers instead of TCP (raw tensors: `compress` is for TCP).
    `in_flight`: what a sync does to the requests running on the servers: "wait" (default)
    lets them finish on the old weights first (each completion is one version's); "keep"
    freezes them, loads, and lets them go on with the new weights (each completion's tokens
    carry the version that sampled them); see docs/async.md.
    """

    shared = True  # every rank of a data-parallel run generates from the same servers (`base.Engine`)

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        timeout: float = 60.0,
        callback_host: str = "127.0.0.1",
        compress: bool = True,
        transport: str = "tcp",
        in_flight: str = "wait",
        admin_token: str | None = None,
    ) -> None:
        if in_flight not in IN_FLIGHT:
            raise ValueError(f"in_flight must be one of {', '.join(IN_FLIGHT)}, got {in_flight!r}")
        self.in_flight = in_flight
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("ServerEngine needs at least one server URL")
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise ValueError(
                f"no token for the servers: pass token=... (CLI: --token-file PATH) or set "
                f"{TOKEN_ENV} to the token the servers were started with"
            )
        admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV, "") or token
        self.timeout = timeout
        self.last_wire_bytes = 0
        self.control = Control(admin_token, timeout)  # every route it calls needs the admin token
        self._tcp = tcp = TcpTransport(self.control, callback_host, compress)  # handshakes, read-backs
        # nccl checks for a GPU before any server is contacted
        self.transport: Transport = NcclTransport(self.control, callback_host) if transport == "nccl" else tcp
        self._servers = [tcp.handshake(url) for url in self.urls]
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
        if isinstance(self.transport, NcclTransport):
            for server in self._servers:
                self.transport.join(server)
        self.dtype: torch.dtype = DTYPES[first.dtype]
        self.vocab_size = first.vocab_size
        limits = [s.max_model_len for s in self._servers]  # the trainer checks its prompts against it
        self.max_model_len: int | None = None if None in limits else min(limits)
        # how the servers merge the factors: each by its measured kernel in host memory (TCP),
        # or by addmm on its accelerator (NCCL); the sync report names it
        kernels = {"addmm"} if transport == "nccl" else {s.merge_kernel for s in self._servers}
        self.merge_kernel = ",".join(sorted(kernels))
        self._completions = CompletionsClient([(s.url, s.model) for s in self._servers], token, timeout)
        self._tokens = TokenGenerator([s.url for s in self._servers], token, timeout)

    # -- the engine interface ---------------------------------------------------------------

    def checkpoint_layout(self) -> Mapping[str, tuple[int, ...]]:
        """The checkpoint names and shapes the servers' model was built from."""
        return self._servers[0].layout

    def weight_groups(self) -> list[list[str]]:
        """Checkpoint names the servers load into one vLLM parameter set (sent together)."""
        return self._servers[0].groups

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load merged checkpoint-format tensors into every server; return the new version.

        Whole tensors: what the `streaming` and `merge-unmerge` strategies send; `factors`
        sends LoRA factors through `load_records` instead, at a fraction of the bytes. A
        `WeightStream` (names known before the tensors are computed) goes to the servers as
        it is read, one tensor held at a time; other iterables are read whole first.
        """
        if not isinstance(weights, WeightStream):
            return self.load_records([Record(name, (t,)) for name, t in weights])
        layout = self.checkpoint_layout()
        unknown = [n for n in weights.names if n not in layout]
        if unknown:
            raise ValueError(f"not tensors of the servers' checkpoint: {unknown[:5]}; plan the sync "
                             "against this engine's checkpoint_layout()")
        declared = [Record(n, (torch.empty(layout[n], dtype=self.dtype, device="meta"),)) for n in weights.names]
        return self._load((Record(name, (t,)) for name, t in weights), declared)

    def load_records(self, records: Sequence[Record]) -> int:
        """Send one transfer to every server, all or none (`update.py`: two phases; a failed
        transfer leaves every server serving the previous version, and ServerSyncError says
        which server failed and why); return the new weight version."""
        records = list(records)
        return self._load(records, records)

    def _load(self, records: Iterable[Record], declared: Sequence[Record]) -> int:
        version = self.weight_version + 1
        try:
            self.last_wire_bytes = update(self.control, self.transport, self._servers, records,
                                          declared, version, self.in_flight)
        except PartlyLoaded:
            self.weight_version = version  # some serve it now: the next sync must not reuse it
            raise
        self.weight_version = version
        return version

    def read_back(self, visit: Callable[[str, torch.Tensor], None], only: Collection[str] | None = None) -> None:
        """Show what the servers hold (`WeightReader`): `visit(name, tensor)` for each tensor
        of each server's model in turn (with `only`, of the modules holding those names),
        under the same checkpoint names, so the weight-level verdict (`check_weights`) judges
        every server: a server that missed a sync shows its stale tensors, counted with the
        others (`tensors` is then the servers times one server's). `read_back_on` says which
        server holds what."""
        for index in range(len(self._servers)):
            self.read_back_on(index, visit, only)

    def read_back_on(self, index: int, visit: Callable[[str, torch.Tensor], None],
                     only: Collection[str] | None = None) -> int:
        """Like `read_back`, on server `index` only; return the bytes it sent (always over
        TCP, one tensor held at a time: `server/transports/readback.py`)."""
        return self._tcp.read_back(self._servers[index], visit, only)

    def follow(self, version: int) -> None:
        """Take `version` as served, after another client (rank 0 of a data-parallel run)
        synced these servers: ServerSyncError unless every server reports serving it."""
        wrong = [f"{s.url} serves {v!r}" for s, v in zip(self._servers, self.served_versions()) if v != str(version)]
        if wrong:
            raise ServerSyncError(f"expected weight version {version}, but {', '.join(wrong)}: another "
                                  "client synced them since (one trainer per server)")
        self.weight_version = version

    def served_versions(self) -> list[str]:
        """The weight version each server reports serving (GET /weight_info)."""
        versions = []
        for s in self._servers:
            answer = self.control.json(s.url, "GET", "/weight_info", retry=True)
            version = answer.get("weight_version") if isinstance(answer, dict) else None
            if not isinstance(version, str):
                raise ServerSyncError(f"{s.url}/weight_info: no weight version (a string) in {answer!r}"[:300])
            versions.append(version)
        return versions

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float = 1.0,
                 n: int = 1, seed: int | None = None) -> list[list[Completion]]:
        """Sample `n` completions per prompt, prompts spread round-robin over the servers.

        With in_flight="keep" a sync may land while they run, so each completion comes with
        the weight version of each of its tokens, as the server recorded them (`tokens.py`).
        """
        client = self._tokens if self.in_flight == "keep" else self._completions
        # each prompt its own seed, by its place in the call, as the colocated engine does
        seeded = [(list(p), prompt_seed(seed, j, n)) for j, p in enumerate(prompts)]
        return self._spread(seeded, lambda i, batch: client.generate(
            i, [p for p, _ in batch], max_tokens, temperature, n, [s for _, s in batch]))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (tokens 1..n-1), spread over the servers."""
        return self._spread([list(s) for s in sequences], self.score_on)

    def score_on(self, index: int, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Like `score`, on server `index` only: echo=True completions of the sequences."""
        return self._completions.score(index, sequences)

    def close(self) -> None:
        """Close the HTTP connections and NCCL groups; the servers keep running."""
        self.transport.close()
        self.control.close()
        self._tokens.close()
        self._completions.close()

    # -- internals --------------------------------------------------------------------------

    def _spread(self, items: Sequence[I], run: Callable[[int, list[I]], list[T]]) -> list[T]:
        """Split `items` round-robin over the servers, run batches in parallel, keep order."""
        k = len(self._servers)
        batches = [(i, [items[j] for j in range(i, len(items), k)]) for i in range(k)]
        batches = [(i, b) for i, b in batches if b]
        with ThreadPoolExecutor(len(batches) or 1) as pool:
            results = list(pool.map(lambda ib: run(*ib), batches))
        out: list = [None] * len(items)
        for (i, _), result in zip(batches, results):
            out[i::k] = result
        return out
