"""The NCCL group of a server sync: its rendezvous, its communicator, its bounded waits.

On GPU machines the bytes of a server sync can go from the trainer's GPU to the servers' GPU
workers over NCCL instead of a TCP stream (`nccl.py` has the transfers: the manifest inline in
the `/update_weights` request, the tensors as one NCCL broadcast each from the trainer, rank
0, to the server's workers, ranks 1..n, in manifest order). This module has the group they
travel in.

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
The client applies the same checks before it sends.

Deadlines: with no store there is no barrier, and NCCL's own calls wait on their peers for
ever (a blocking init for a rank that never comes, a broadcast for a peer that died). So every
communicator here is non-blocking (`Communicator`: `ncclCommInitRankConfig` with
`blocking=0`), and each wait is a poll (`await_ready`, `wait`) of the communicator's state
(`ncclCommGetAsyncError`) and of CUDA events, under one deadline: the join, and the whole of
one transfer. On expiry or on an error NCCL reports, the communicator is aborted
(`ncclCommAbort`) and PayloadError says what happened, how far it got, and which setting
raises the limit (the server's LORASYNC_TRANSFER_TIMEOUT, the client's `timeout`); the group is
gone then, and refuses later transfers (`check_open`) until the client connects again. The
waiting is plain Python over four methods of the communicator (`ready`, `async_error`,
`mark`, `abort`, besides `broadcast`), which the tests' stand-in implements.

Used by both halves of `nccl.py` (the client's `open_group`/`NcclTransport`, the receiver's
`join_workers`/`receive`), so it imports neither side. NCCL itself runs only on GPU machines:
the tests (tests/server/transports/test_nccl.py, test_nccl_group.py) drive this module with an
in-process stand-in for the communicator; those that need NCCL are marked `gpu` and skipped
without CUDA (so `Communicator` has not run on a GPU here).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lorasync.server.transports.wire import Deadline, PayloadError

# How often a wait looks at the communicator and its broadcasts (seconds).
_POLL = 0.05
# ncclResult_t: ncclSuccess, and ncclInProgress (a non-blocking call still under way)
_SUCCESS, _IN_PROGRESS = 0, 7
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
    """Start joining the group as the trainer (rank 0) on CUDA device `device`; returns at
    once (NCCL's init runs on): `await_ready` waits for the workers."""
    meeting = read_rendezvous(message)
    return _opened(_communicator(meeting.unique_id, 0, meeting.world_size, device))


def join_workers(message: Mapping[str, Any], parallel_config: Any, deadline: Deadline) -> Any:
    """Join the group as one of the server's workers, inside vLLM's worker: check the message
    (PayloadError, before NCCL is called), then join on the worker's current device and wait
    until every rank has joined, at most until `deadline`: then, or on an error NCCL reports,
    the communicator is aborted and PayloadError says so."""
    meeting = read_rendezvous(message)
    rank = worker_rank(meeting, parallel_config)
    group = _opened(_communicator(meeting.unique_id, rank, meeting.world_size, None))
    await_ready(group, deadline, lambda problem: (
        f"this worker (rank {rank} of {meeting.world_size}) could not join the NCCL group: "
        f"{problem}; it left the group (communicator aborted): the client must connect again "
        "(did the trainer die, or can this machine not reach it?)"))
    return group


def await_ready(
    group: Any, deadline: Deadline, explain: Callable[[str], str], stop: Callable[[], bool] | None = None
) -> None:
    """Wait until `group` has joined: every rank is in (see `wait`)."""
    wait(group, group.ready, deadline, explain, stop)


def wait(
    group: Any, done: Callable[[], bool], deadline: Deadline, explain: Callable[[str], str],
    stop: Callable[[], bool] | None = None,
) -> None:
    """Poll until `done()`. On an error NCCL reports for `group`, on `stop()` (the caller's
    reason to give up: its request failed) or once `deadline` passes: abort `group` and raise
    PayloadError(`explain(problem)`), taken before the abort (after it, every broadcast that
    was pending looks finished)."""
    while True:
        error = group.async_error()
        if error is not None:
            problem = f"NCCL reported: {error}"
        elif done():
            return
        elif stop is not None and stop():
            problem = "the other side gave up"
        elif time.monotonic() >= deadline.end:
            problem = f"its time limit of {deadline.seconds:g} s passed (to give it more: {deadline.fix})"
        else:
            time.sleep(_POLL)
            continue
        message = explain(problem)
        group.abort()
        raise PayloadError(message)


def _opened(group: Any) -> Any:
    """`group`, refused if NCCL is off in it: a communicator is built disabled, without
    joining, when VLLM_DISABLE_PYNCCL is set."""
    if getattr(group, "disabled", False):
        raise RuntimeError(
            "NCCL is disabled in this process (VLLM_DISABLE_PYNCCL is set): it did not join "
            "the group; unset it, or use transport='tcp'"
        )
    return group


def check_open(group: Any) -> None:
    if getattr(group, "disabled", False):
        raise PayloadError(
            "this NCCL group is closed (an earlier transfer on it failed, and its communicator "
            "was aborted); the client must connect again (a new ServerEngine) to open a new one"
        )


def _communicator(unique_id: bytes, rank: int, world_size: int, device: int | None) -> Any:
    """A `Communicator` joining by `unique_id` alone on CUDA device `device` (None: the current
    one, as vLLM's own worker-side join). The tests replace this function."""
    if device is None:
        device = torch.accelerator.current_device_index()
    return Communicator(unique_id, rank, world_size, torch.device("cuda", device))


class _Config(ctypes.Structure):
    """The head of NCCL's `ncclConfig_t`, up to `blocking` (NCCL 2.14's layout). NCCL copies
    `size` bytes of it over its defaults and, for a config declaring version 2.14, takes every
    later field as unset; so this stays valid for later NCCL versions."""

    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int)]


class Communicator:
    """One rank's NCCL communicator, non-blocking: no call on it waits for a peer.

    Not vLLM's `PyNcclCommunicator`: it joins with `ncclCommInitRank`, which blocks until every
    rank has joined (for ever if one never comes), and vLLM's wrapper (`NCCLLibrary`) lacks
    `ncclCommInitRankConfig` (the non-blocking init) and `ncclCommGetAsyncError` (the state):
    they are declared here with ctypes, on the library vLLM loads (VLLM_NCCL_SO_PATH), and
    vLLM's own functions serve the rest. Built from the id alone (see the module docstring),
    with vLLM's NCCL settings unpinned while the init runs (as for its own shared groups), and
    no warm-up all_reduce: both sides build theirs here. A call on it may return
    ncclInProgress: `ready()` turns true once it is under way, and the next call waits for
    that. Written against NCCL's documented non-blocking API; not run on a GPU here.
    """

    def __init__(self, unique_id: bytes, rank: int, world_size: int, device: torch.device) -> None:
        import vllm.envs as envs
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary, ncclComm_t, ncclUniqueId
        from vllm.utils.nccl import unpinned_nccl_env

        self.rank, self.world_size, self.device = rank, world_size, device
        self.disabled = bool(envs.VLLM_DISABLE_PYNCCL)  # refused by `_opened`
        if self.disabled:
            return
        self.nccl = NCCLLibrary()
        lib = self.nccl.lib
        lib.ncclCommInitRankConfig.restype = lib.ncclCommGetAsyncError.restype = ctypes.c_int
        lib.ncclCommInitRankConfig.argtypes = [
            ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int, ctypes.POINTER(_Config)]
        lib.ncclCommGetAsyncError.argtypes = [ncclComm_t, ctypes.POINTER(ctypes.c_int)]
        self.comm = ncclComm_t()
        self._env = contextlib.ExitStack()  # NCCL's init reads the settings on its own thread
        self._env.enter_context(unpinned_nccl_env())
        config = _Config(ctypes.sizeof(_Config), 0xCAFEBEEF, 21400, 0)  # NCCL 2.14.0, blocking=0
        with torch.cuda.device(device):
            result = lib.ncclCommInitRankConfig(
                ctypes.byref(self.comm), world_size, self.nccl.unique_id_from_bytes(unique_id), rank,
                ctypes.byref(config))
        if result not in (_SUCCESS, _IN_PROGRESS):
            self._env.close()
            self.disabled = True
            raise RuntimeError(f"NCCL error: {self.nccl.ncclGetErrorString(result)}")

    def _state(self) -> int:
        state = ctypes.c_int()
        result = self.nccl.lib.ncclCommGetAsyncError(self.comm, ctypes.byref(state))
        return result if result != _SUCCESS else state.value

    def ready(self) -> bool:
        """The last call (the init, a broadcast's enqueueing) is done: the next may come."""
        if self._state() == _IN_PROGRESS:
            return False
        self._env.close()  # the init is over: vLLM's pinned settings come back
        return True

    def async_error(self) -> str | None:
        state = self._state()
        return None if state in (_SUCCESS, _IN_PROGRESS) else self.nccl.ncclGetErrorString(state)

    def broadcast(self, tensor: torch.Tensor, src: int, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue a broadcast of `tensor` from rank `src` on `stream` (None: the current)."""
        from vllm.distributed.device_communicators.pynccl_wrapper import (
            buffer_type, cudaStream_t, ncclDataTypeEnum)

        if self.disabled:
            raise RuntimeError("broadcast on an aborted NCCL communicator")
        assert tensor.device == self.device, f"tensor on {tensor.device}, communicator on {self.device}"
        stream = stream or torch.cuda.current_stream(self.device)
        data = buffer_type(tensor.data_ptr())
        result = self.nccl._funcs["ncclBroadcast"](
            data if src == self.rank else buffer_type(), data, tensor.numel(),
            ncclDataTypeEnum.from_torch(tensor.dtype), src, self.comm, cudaStream_t(stream.cuda_stream))
        if result not in (_SUCCESS, _IN_PROGRESS):
            raise RuntimeError(f"NCCL error: {self.nccl.ncclGetErrorString(result)}")

    def mark(self, stream: torch.cuda.Stream | None) -> Callable[[], bool]:
        """Whether what is enqueued on `stream` so far has finished: a CUDA event's query."""
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(self.device))
        return event.query

    def abort(self) -> None:
        """`ncclCommAbort`: ends the communicator's pending work and frees it; callable at any
        time, init under way included. On a thread, at most 5 s waited for (as vLLM's
        `destroy`): it must not wedge the caller either."""
        if self.disabled:
            return
        self.disabled = True
        self._env.close()

        def abort() -> None:
            with torch.cuda.device(self.device):
                self.nccl.lib.ncclCommAbort(self.comm)  # its result: the group is gone either way

        thread = threading.Thread(target=abort, name="lorasync-nccl-abort", daemon=True)
        thread.start()
        thread.join(5.0)

    destroy = abort  # the callers' name for closing a group (receiver.shutdown, NcclTransport.close)
