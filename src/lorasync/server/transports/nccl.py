"""The NCCL transport, both halves: the manifest inline in the request, the tensors by NCCL
broadcast.

On GPU machines the bytes go from this process's current CUDA device (the client's half:
`open_group`, `NcclTransport`) to the servers' GPU workers (the receiver's half, which
`serve/receiver.py` calls: `join_workers`, `receive`); `nccl_group.py` has the group, its
rendezvous by NCCL unique id, and the broadcasts. NCCL itself needs GPUs: tests/server/transports/test_nccl.py drives this with
an in-process stand-in for the communicator, and its end-to-end tests are marked `gpu`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lorasync.served_model import DTYPES
from lorasync.server.client.control import Control, ServerInfo, ServerSyncError
from lorasync.server.transports.nccl_group import (
    join_workers,
    mint_unique_id,
    open_trainer,
    read_rendezvous,
    recv_records,
    rendezvous,
    send_records,
    wait_sent,
)
from lorasync.server.transports.wire import PayloadError, check_payload, manifest
from lorasync.sync.base import Record

# How often `open_group` looks at the two halves of a join while it waits (seconds).
_POLL = 0.05


def open_group(control: Control, url: str, workers: int, device: int) -> Any:
    """Open an NCCL group with the `workers` workers of the server at `url`, this process
    being rank 0 on CUDA device `device`; return this process's communicator.

    This process mints an NCCL unique id and sends it in the (token-guarded) init request;
    the server's workers join with it. There is no store, so no barrier: every rank must be
    in NCCL's init while the others are, and this process joins on a thread of its own while
    the request runs (it returns once the workers have joined). NCCL gives a rank that never
    comes no timeout, so the message is checked here as the server will check it before
    anything is sent; if the server refuses it anyway, or a worker fails to join, this
    process's half of the init is left blocked on its (daemon) thread, which nothing can
    cancel, and the error says why.
    """
    message = rendezvous(mint_unique_id(), workers)
    read_rendezvous(message)  # the server's own check: a refusal there strands this side
    joined: dict[str, Any] = {}

    def join() -> None:
        try:
            joined["group"] = open_trainer(message, device)
        except Exception as err:  # reported below, in this process's words
            joined["error"] = err

    thread = threading.Thread(target=join, name="lorasync-nccl-join", daemon=True)
    thread.start()
    request = control.start(url, "/init_weight_transfer_engine", json={"init_info": {"nccl": message}})
    deadline = time.monotonic() + control.timeout
    while request.running() and "error" not in joined and time.monotonic() < deadline:
        time.sleep(_POLL)
    if not request.running():
        request.wait()  # the server's answer: its refusal, or a worker's failure to join
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise ServerSyncError(
                f"{url}: its workers joined the NCCL group, but this process did not within "
                f"{control.timeout:.0f} s"
            )
    elif "error" not in joined:
        raise ServerSyncError(
            f"{url}: its workers did not join the NCCL group within {control.timeout:.0f} s "
            "(is the server on another GPU than this process, and can it reach this machine? "
            "NCCL_SOCKET_IFNAME chooses the interface NCCL offers)"
        )
    if "error" in joined:
        err = joined["error"]
        raise ServerSyncError(
            f"{url}: this process could not join the NCCL group ({type(err).__name__}: {err}); "
            "the server's workers may be left waiting in NCCL's init: restart the server"
        )
    return joined["group"]


class NcclTransport:
    """Transfers by NCCL broadcast from this process (rank 0) to each server's workers."""

    def __init__(self, control: Control, host: str) -> None:
        # `host` (the client's callback_host) is not used: the servers reach this process at
        # the address NCCL puts in the unique id (see `nccl.mint_unique_id`)
        if not torch.cuda.is_available():
            raise ValueError(
                "transport='nccl' sends from a CUDA GPU and this process has none; use "
                "transport='tcp' (the default), which needs no accelerator"
            )
        self.control = control
        self.stream = torch.cuda.Stream()
        self._servers: list[ServerInfo] = []

    def join(self, server: ServerInfo) -> None:
        """Open an NCCL group with one server's workers, this process being rank 0."""
        server.group = open_group(self.control, server.url, server.workers, torch.cuda.current_device())
        self._servers.append(server)

    def send(self, servers: Sequence[ServerInfo], records: Iterable[Record], declared: Sequence[Record]) -> int:
        """Transfer `records` to each server in turn (so, unlike TCP's fan-out, they are held
        whole on the GPU meanwhile); return the bytes moved to each."""
        records = list(records)
        if [r.name for r in records] != [r.name for r in declared]:
            raise ValueError("the records to send are not the ones declared")
        return max((self._send(server, records) for server in servers), default=0)

    def _send(self, server: ServerInfo, records: list[Record]) -> int:
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
        request = self.control.start(server.url, "/update_weights", json={"update_info": {"manifest": head}})
        device = torch.device("cuda", torch.cuda.current_device())
        sent = send_records(server.group, records, device, self.stream)
        try:
            wait_sent(self.stream, request.running, request.failed, self.control.timeout)
        except PayloadError as err:
            # Abandoned, not destroyed: destroying a communicator with a broadcast pending
            # blocks. Its stream is this transport's own, so the trainer's work is not held up.
            server.group = None
            raise request.error or ServerSyncError(f"{server.url}: {err}") from None
        request.wait()
        return len(json.dumps(head)) + sum(t.numel() * t.element_size() for t in sent)

    def close(self) -> None:
        for server in self._servers:
            if server.group is not None:
                server.group.destroy()
                server.group = None


# --- the receiver's half: inside vLLM's worker (`serve/receiver.py`) -----------------------------
# `join_workers` (imported above from nccl_group.py) joins the trainer's group at init.


def receive(
    group: Any, head: dict, layout: Mapping[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int,
    device: Any,
) -> list[Record]:
    """The tensors the manifest `head` declares, checked against `layout` first, broadcast by
    the trainer over the NCCL `group` this worker joined (`join_workers`) at init."""
    if group is None:
        raise PayloadError(
            "an NCCL update before this server joined an NCCL group: the client's "
            "ServerEngine(transport='nccl') joins it at connection"
        )
    if head.get("encoding", "raw") != "raw":
        raise PayloadError("NCCL transfers carry raw tensors; compression is for TCP")
    return recv_records(group, check_payload(head, layout, dtype, max_bytes), dtype, device)
