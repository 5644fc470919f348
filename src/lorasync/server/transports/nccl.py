"""The NCCL transport, both halves: the manifest inline in the request, the tensors by NCCL
broadcast.

On GPU machines the bytes go from this process's current CUDA device (the client's half:
`open_group`, `NcclTransport`, `send_records`) to the servers' GPU workers (the receiver's
half, which `serve/receiver.py` calls: `join_workers`, `receive`); `nccl_group.py` has the
group: its rendezvous by NCCL unique id, its non-blocking communicator, and the waits that
bound every step by a deadline (a join, a whole transfer) and abort the communicator when it
passes. NCCL itself needs GPUs: tests/server/transports/test_nccl.py drives this with an
in-process stand-in for the communicator, and its end-to-end tests are marked `gpu`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from lorasync.served_model import DTYPES
from lorasync.server.client.control import Control, ServerInfo, ServerSyncError
from lorasync.server.transports.nccl_group import (
    await_ready,
    check_open,
    join_workers,
    mint_unique_id,
    open_trainer,
    read_rendezvous,
    rendezvous,
    wait,
)
from lorasync.server.transports.wire import Deadline, PayloadError, check_payload, manifest
from lorasync.sync.base import Record


def open_group(control: Control, url: str, workers: int, device: int) -> Any:
    """Open an NCCL group with the `workers` workers of the server at `url`, this process
    being rank 0 on CUDA device `device`; return this process's communicator.

    This process mints an NCCL unique id, starts its own (non-blocking) join, and sends the
    id in the (token-guarded) init request; the server's workers join with it. There is no
    store, so no barrier: every rank must be in NCCL's init while the others are. So the
    message is checked here as the server will check it before anything is sent, and this
    process waits for the group at most `control.timeout`: if the server refuses, a worker
    fails to join, or the time runs out, its communicator is aborted and the error says why
    (the server's workers give up by their own deadline, LORASYNC_TRANSFER_TIMEOUT there).
    """
    message = rendezvous(mint_unique_id(), workers)
    read_rendezvous(message)  # the server's own check: a refusal there would waste a join
    try:
        group = open_trainer(message, device)
    except Exception as err:  # NCCL refused to start this process's join: the server is not called
        raise ServerSyncError(
            f"{url}: this process could not join the NCCL group ({type(err).__name__}: {err})"
        ) from None
    request = control.start(url, "/init_weight_transfer_engine", json={"init_info": {"nccl": message}})
    fix = f"ServerEngine(timeout=seconds), now {control.timeout:g}"

    def explain(problem: str) -> str:
        return (
            f"{url}: its workers and this process did not form the NCCL group: {problem}; this "
            "process left it (communicator aborted). Is the server on another GPU than this "
            "process, and can it reach this machine? (NCCL_SOCKET_IFNAME chooses the interface)"
        )

    try:
        await_ready(group, Deadline(control.timeout, fix), explain, stop=request.failed)
    except PayloadError as err:  # the server's answer, when it failed, says why: its refusal, a worker's failure
        raise (request.error if request.failed() else ServerSyncError(str(err))) from None
    try:
        request.wait()  # the workers joined too: their answer comes
    except ServerSyncError:
        group.abort()
        raise
    return group


class NcclTransport:
    """Transfers by NCCL broadcast from this process (rank 0) to each server's workers."""

    def __init__(self, control: Control, host: str) -> None:
        # `host` (the client's callback_host) is not used: the servers reach this process at
        # the address NCCL puts in the unique id (see `nccl_group.mint_unique_id`)
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
        deadline = Deadline(self.control.timeout, f"ServerEngine(timeout=seconds), now {self.control.timeout:g}")
        try:
            sent = send_records(server.group, records, device, self.stream, deadline, request.failed)
            wait_sent(server.group, self.stream, deadline, request.failed)
        except PayloadError as err:
            # aborted by the wait (its stream is this transport's own: the trainer's work was
            # not held up meanwhile); the server's error, when it answered with one, says why
            server.group = None
            raise request.error or ServerSyncError(f"{server.url}: {err}") from None
        request.wait()
        return len(json.dumps(head)) + sum(t.numel() * t.element_size() for t in sent)

    def close(self) -> None:
        for server in self._servers:
            if server.group is not None:
                server.group.destroy()
                server.group = None


# --- the client's half: the broadcasts ------------------------------------------------------


def pack(records: Sequence[Record]) -> list[torch.Tensor]:
    """The tensors of `records` in broadcast order: the manifest's, each record's tensors in
    turn (a lora record's b, then a). Dtypes are kept: the receiver allocates each in the
    manifest's dtype, which its check made the server's, and NCCL must be given the same
    dtype and element count on every rank."""
    return [t for r in records for t in r.tensors]


def send_records(
    group: Any, records: Sequence[Record], device: torch.device, stream: torch.cuda.Stream | None,
    deadline: Deadline, stop: Callable[[], bool] | None = None,
) -> list[torch.Tensor]:
    """Enqueue one broadcast per tensor on `stream`, in manifest order; return the tensors.

    The broadcasts go on a stream of their own: if the receiver never joins them (it refused
    the manifest, or died), they never finish, and the trainer's own work on its current
    stream must not wait behind them. NCCL sends `numel` elements from `data_ptr()`, so each
    tensor goes contiguous on `device`, recorded on `stream` so that the allocator does not
    hand its memory out again before the broadcast has read it. Each enqueueing is waited for
    (`wait`: non-blocking NCCL) under `deadline`, or until `stop()`. A CPU `device` (no
    stream) is for the tests' stand-in communicator.
    """
    check_open(group)
    sent = [t.detach().to(device).contiguous() for t in pack(records)]
    cuda = device.type == "cuda"
    if cuda:
        stream.wait_stream(torch.cuda.current_stream(device))  # the copies above are on that stream
    try:
        for tensor in sent:
            group.broadcast(tensor, src=0, stream=stream)
            wait(group, group.ready, deadline, _unsent, stop)
            if cuda:
                tensor.record_stream(stream)
    except PayloadError:
        raise
    except Exception as err:  # NCCL refused a broadcast: the group is not to be trusted
        group.abort()
        raise PayloadError(_unsent(f"{type(err).__name__}: {err}")) from None
    return sent


def wait_sent(group: Any, stream: torch.cuda.Stream | None, deadline: Deadline, stop: Callable[[], bool]) -> None:
    """Wait, at most until `deadline`, for the broadcasts on `stream` to finish.

    The receiver refuses a bad manifest before it joins any broadcast, and a dead server never
    joins; the broadcasts then never finish. So this polls instead of synchronizing: it stops
    when the request has failed (`stop()`: the caller raises its error), on an error NCCL
    reports, or when time runs out, and aborts the group then.
    """
    wait(group, group.mark(stream), deadline, _unsent, stop)


def _unsent(problem: str) -> str:
    return (
        f"the NCCL broadcasts did not complete: {problem} (the server refused the manifest, or "
        "died?); the NCCL group is aborted: make a new ServerEngine to sync again"
    )


# --- the receiver's half: inside vLLM's worker (`serve/receiver.py`) -----------------------------
# `join_workers` (imported above from nccl_group.py) joins the trainer's group at init.


def receive(
    group: Any, head: dict, layout: Mapping[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int,
    device: Any, deadline: Deadline,
) -> list[Record]:
    """The tensors the manifest `head` declares, checked against `layout` first, broadcast by
    the trainer over the NCCL `group` this worker joined (`join_workers`) at init, all of them
    by `deadline` (`recv_records`)."""
    if group is None:
        raise PayloadError(
            "an NCCL update before this server joined an NCCL group: the client's "
            "ServerEngine(transport='nccl') joins it at connection"
        )
    if head.get("encoding", "raw") != "raw":
        raise PayloadError("NCCL transfers carry raw tensors; compression is for TCP")
    return recv_records(group, check_payload(head, layout, dtype, max_bytes), dtype, device, deadline)


def recv_records(
    group: Any,
    checked: list[tuple[str, float | None, list[tuple[int, ...]]]],
    dtype: torch.dtype,
    device: torch.device,
    deadline: Deadline,
) -> list[Record]:
    """Receive the tensors of a checked manifest, in its order, onto `device`, all by `deadline`.

    All or nothing: a broadcast that fails, an error NCCL reports, or the deadline passing
    raises PayloadError naming how many records had arrived, returns none of them, and aborts
    the group, whose state NCCL no longer vouches for (`check_open` refuses it afterwards).
    A CPU `device` is for the tests' stand-in communicator.
    """
    check_open(group)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    records: list[Record] = []
    marks: list[Callable[[], bool]] = []  # one a record: has it arrived?

    def explain(problem: str) -> str:
        arrived = sum(1 for arrived in marks if arrived())
        return (
            f"the NCCL transfer failed after {arrived} of {len(checked)} records arrived: {problem}. "
            "Nothing of this transfer is kept, and this server's NCCL group is closed (communicator "
            "aborted): the client must connect again"
        )

    try:
        for name, scale, shapes in checked:
            tensors = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
            for tensor in tensors:
                group.broadcast(tensor, src=0, stream=stream)
                wait(group, group.ready, deadline, explain)  # enqueued: the next call may come
            records.append(Record(name, tensors, scale))
            marks.append(group.mark(stream))
        if marks:
            wait(group, marks[-1], deadline, explain)
    except PayloadError:
        raise
    except Exception as err:
        message = explain(f"{type(err).__name__}: {err}")
        group.abort()
        raise PayloadError(message) from None
    return records
