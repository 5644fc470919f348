"""The NCCL path of a server sync: the records of `wire.py`, moved by NCCL broadcast.

On GPU machines the bytes of a server sync can go from the trainer's GPU to the servers' GPU
workers over NCCL instead of a TCP stream. Everything else stays as on the TCP path: the
same records (LoRA factors, or whole tensors), the same manifest, checked by the receiver
against its checkpoint before any byte moves, and the same two-phase load. Only the bytes
travel differently: the manifest goes inline in the `/update_weights` request, and the
tensors follow as one NCCL broadcast each from the trainer (rank 0) to the server's workers
(ranks 1..n), in manifest order.

Rendezvous: by an NCCL unique id carried in the token-guarded `/init_weight_transfer_engine`
request; no store, no pickle. The trainer mints the id (`ncclGetUniqueId`: 128 bytes naming
its NCCL bootstrap socket, and a random magic that socket requires of whoever connects) and
sends it as base64 in the request's JSON with the group's size and rank assignment
(`rendezvous`); every rank builds its communicator from those bytes (`_communicator`).
vLLM's usual rendezvous, a `StatelessProcessGroup` over a TCPStore, is not used: its
`broadcast_obj` unpickles what the store holds, so whoever reached the store's port could run
code in the server (issue #15). The receiver reads the message as untrusted input
(`read_rendezvous`, `worker_rank`: exact id length, canonical base64, world size = 1 + its
workers, ranks in range) and refuses anything else with PayloadError before it calls NCCL.
The client applies the same checks before it sends: with no store there is no barrier and no
timeout, so a rank that never comes leaves the others waiting in NCCL's init.

Used by both halves of `nccl.py` (the client's `NcclTransport`, the receiver's
`join_workers`/`receive`), so it imports neither side. NCCL itself runs only on GPU
machines: the tests (tests/server/transports/test_nccl.py) drive this module with an in-process stand-in for the communicator; those that need NCCL are
marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorasync.server.transports.wire import PayloadError
from lorasync.sync.base import Record

# How often the client looks at its broadcasts while it waits for them (seconds).
_POLL = 0.05
# sizeof(ncclUniqueId), NCCL's NCCL_UNIQUE_ID_BYTES: fixed by NCCL's ABI. Kept here so that
# the receiver checks a message without loading NCCL.
UNIQUE_ID_BYTES = 128
_UNIQUE_ID_CHARS = 4 * -(-UNIQUE_ID_BYTES // 3)  # its standard base64, padded: 172
FIELDS = ("unique_id", "world_size", "first_worker_rank")


@dataclass(frozen=True)
class Meeting:
    """A checked rendezvous message: the id every rank joins with, and the ranks."""

    unique_id: bytes = field(repr=False)  # whoever holds it can join the group
    world_size: int  # the trainer and the server's workers
    first_worker_rank: int  # the workers are ranks first_worker_rank.. (the trainer is 0)


def rendezvous(unique_id: bytes, server_workers: int) -> dict[str, Any]:
    """The rendezvous message (JSON) of an NCCL group: the trainer is rank 0, the server's
    `server_workers` workers ranks 1..n, all joining with `unique_id`."""
    if len(unique_id) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
    if server_workers < 1:
        raise ValueError(f"a server has at least one worker, got {server_workers}")
    return {
        "unique_id": base64.b64encode(unique_id).decode("ascii"),
        "world_size": 1 + server_workers,
        "first_worker_rank": 1,
    }


def read_rendezvous(message: object) -> Meeting:
    """Check a rendezvous message as untrusted input; PayloadError says what is wrong."""
    if not isinstance(message, Mapping):
        raise PayloadError(f"the NCCL rendezvous must be a JSON object, got {type(message).__name__}")
    if set(message) != set(FIELDS):
        raise PayloadError(
            f"the NCCL rendezvous has fields {sorted(map(str, message))}, expected {list(FIELDS)} "
            "(this server joins by NCCL unique id only, never by address and port: client "
            "and server versions differ?)"
        )
    encoded = message["unique_id"]
    if not isinstance(encoded, str) or len(encoded) != _UNIQUE_ID_CHARS:
        raise PayloadError(
            f"unique_id must be the {UNIQUE_ID_BYTES}-byte NCCL unique id in standard base64 "
            f"({_UNIQUE_ID_CHARS} characters)"
        )
    try:
        unique_id = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError("unique_id is not standard base64 (RFC 4648, not URL-safe)") from None
    # canonical: the one encoding of these bytes (no stray padding bits)
    if len(unique_id) != UNIQUE_ID_BYTES or base64.b64encode(unique_id).decode("ascii") != encoded:
        raise PayloadError(f"unique_id must decode to exactly {UNIQUE_ID_BYTES} bytes")
    world_size, first = message["world_size"], message["first_worker_rank"]
    if not _is_int(world_size) or world_size < 2:
        raise PayloadError(
            f"world_size must be an int of at least 2 (the trainer and a worker), got {world_size!r}"
        )
    if not _is_int(first) or first != 1:
        raise PayloadError(
            f"first_worker_rank must be 1 (the trainer is rank 0 and sends every broadcast; "
            f"the workers follow), got {first!r}"
        )
    return Meeting(unique_id, world_size, first)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def worker_rank(meeting: Meeting, parallel_config: Any) -> int:
    """This worker's rank in the group; PayloadError if the group does not fit this server."""
    workers = parallel_config.world_size  # tensor x pipeline parallel, as the server reports
    if meeting.world_size != 1 + workers:
        raise PayloadError(
            f"the NCCL group has world size {meeting.world_size}, but this server has {workers} "
            f"worker(s): it must be {1 + workers} (the trainer and each worker)"
        )
    # vLLM's numbering (nccl_common.worker_init_process_group): unique across data parallel
    index = getattr(parallel_config, "data_parallel_index", 0) * workers + parallel_config.rank
    rank = meeting.first_worker_rank + index
    if not meeting.first_worker_rank <= rank < meeting.world_size:
        raise PayloadError(
            f"worker {index} would be rank {rank}, outside the group's {meeting.world_size} "
            "ranks: a data-parallel server cannot join an NCCL group; use transport='tcp'"
        )
    return rank


def mint_unique_id() -> bytes:
    """A fresh NCCL unique id, minted in this process (the trainer), which hosts the group's
    NCCL bootstrap from now on. NCCL picks the bootstrap's address (NCCL_SOCKET_IFNAME
    chooses the interface); the server's workers connect to it."""
    import vllm.envs as envs
    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    if envs.VLLM_DISABLE_PYNCCL:
        raise ValueError("VLLM_DISABLE_PYNCCL is set in this process; unset it for transport='nccl'")
    return bytes(NCCLLibrary().ncclGetUniqueId())


def open_trainer(message: Mapping[str, Any], device: int) -> Any:
    """Join the group as the trainer (rank 0) on CUDA device `device`; blocks until every
    worker has joined too. (The caller names the device: it joins on a thread of its own,
    whose current device is not the caller's.)"""
    meeting = read_rendezvous(message)
    return _opened(_communicator(meeting.unique_id, 0, meeting.world_size, device))


def join_workers(message: Mapping[str, Any], parallel_config: Any) -> Any:
    """Join the group as one of the server's workers, inside vLLM's worker: check the message
    (PayloadError, before NCCL is called), then join on the worker's current device; blocks
    until every rank has joined."""
    meeting = read_rendezvous(message)
    rank = worker_rank(meeting, parallel_config)
    return _opened(_communicator(meeting.unique_id, rank, meeting.world_size, None))


def _communicator(unique_id: bytes, rank: int, world_size: int, device: int | None) -> Any:
    """A `PyNcclCommunicator` built from `unique_id` alone, on `device` (None: the current).

    Not `PyNcclCommunicator(group)`: that one takes the id from its group's `broadcast_obj`,
    which unpickles it out of a TCPStore (see the module docstring). vLLM 0.32's store-free
    constructor, `PyNcclCommunicator.from_unique_id_bytes` (in `nccl_common`'s
    `uid_init_process_group`, with vLLM's NCCL settings unpinned as for its own groups), calls
    `ncclCommInitRank` with these bytes, then runs a one-element all_reduce as a warm-up:
    both sides build theirs here, so they agree on it. The tests replace this function.
    """
    from vllm.distributed.weight_transfer.nccl_common import uid_init_process_group

    if device is None:
        device = torch.accelerator.current_device_index()  # as vLLM's own worker-side join
    return uid_init_process_group(unique_id, rank, world_size, device)


def _opened(group: Any) -> Any:
    """`group`, refused if NCCL is off in it: `PyNcclCommunicator` is built disabled, without
    joining, when VLLM_DISABLE_PYNCCL is set, and a disabled one skips every broadcast."""
    if getattr(group, "disabled", False):
        raise RuntimeError(
            "NCCL is disabled in this process (VLLM_DISABLE_PYNCCL is set): it did not join "
            "the group; unset it, or use transport='tcp'"
        )
    return group


def _check_open(group: Any) -> None:
    if getattr(group, "disabled", False):
        raise PayloadError(
            "this NCCL group is closed (an earlier transfer on it failed); the client must "
            "connect again (a new ServerEngine) to open a new one"
        )


def pack(records: Sequence[Record]) -> list[torch.Tensor]:
    """The tensors of `records` in broadcast order: the manifest's, each record's tensors in
    turn (a lora record's b, then a). Dtypes are kept: the receiver allocates each in the
    manifest's dtype, which its check made the server's, and NCCL must be given the same
    dtype and element count on every rank."""
    return [t for r in records for t in r.tensors]


def send_records(
    group: Any, records: Sequence[Record], device: torch.device, stream: torch.cuda.Stream | None
) -> list[torch.Tensor]:
    """Enqueue one broadcast per tensor on `stream`, in manifest order; return the tensors.

    The broadcasts go on a stream of their own: if the receiver never joins them (it refused
    the manifest, or died), they wait forever, and the trainer's own work on its current
    stream must not wait behind them. NCCL sends `numel` elements from `data_ptr()`, so each
    tensor goes contiguous on `device`, recorded on `stream` so that the allocator does not
    hand its memory out again before the broadcast has read it. A CPU `device` (no stream) is
    for the tests' stand-in communicator.
    """
    _check_open(group)
    sent = [t.detach().to(device).contiguous() for t in pack(records)]
    cuda = device.type == "cuda"
    if cuda:
        stream.wait_stream(torch.cuda.current_stream(device))  # the copies above are on that stream
    for tensor in sent:
        group.broadcast(tensor, src=0, stream=stream)
        if cuda:
            tensor.record_stream(stream)
    return sent


def wait_sent(
    stream: torch.cuda.Stream, running: Callable[[], bool], failed: Callable[[], bool], timeout: float
) -> None:
    """Wait, at most `timeout` seconds, for the broadcasts on `stream` to finish.

    The receiver refuses a bad manifest before it joins any broadcast, and a dead server never
    joins; the broadcasts then never finish. So this polls instead of synchronizing: it stops
    when the request has failed (the caller raises its error), or when time runs out.
    """
    deadline = time.monotonic() + timeout
    while not stream.query():
        if (not running() and failed()) or time.monotonic() > deadline:
            raise PayloadError(
                "the NCCL broadcasts did not complete (the server refused the manifest, died, "
                f"or took over {timeout:.0f} s); the NCCL group is unusable now: make a new "
                "ServerEngine to sync again"
            )
        time.sleep(_POLL)


def recv_records(
    group: Any,
    checked: list[tuple[str, float | None, list[tuple[int, ...]]]],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Record]:
    """Receive the tensors of a checked manifest, in its order, onto `device`.

    All or nothing: a broadcast that fails raises PayloadError and returns none of the
    tensors, and closes the group, whose state NCCL no longer vouches for (a closed
    `PyNcclCommunicator` would skip later broadcasts silently; `_check_open` refuses them
    instead). A CPU `device` is for the tests' stand-in communicator.
    """
    _check_open(group)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    total = sum(len(shapes) for _, _, shapes in checked)
    done, records = 0, []
    try:
        for name, scale, shapes in checked:
            tensors = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
            for tensor in tensors:
                group.broadcast(tensor, src=0, stream=stream)
                done += 1
            records.append(Record(name, tensors, scale))
        if stream is not None:
            stream.synchronize()
    except Exception as err:
        group.destroy()
        raise PayloadError(
            f"the NCCL transfer failed after {done} of {total} broadcasts "
            f"({type(err).__name__}: {err}); "
            "nothing of this transfer is kept, and this server's NCCL group is closed"
        ) from None
    return records
