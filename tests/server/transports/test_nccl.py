"""Server mode over NCCL.

Without a GPU: the rendezvous message (an NCCL unique id in the init request's JSON), the
checks the receiver makes of it, the join and the record broadcasts, driven through an
in-process stand-in for NCCL's communicator (`Hub`, non-blocking as the real one), and the
error paths (a worker that fails to join, a broadcast that fails mid-way; the deadlines on the
join and on a transfer: tests/server/transports/test_nccl_group.py). With GPUs (marked `gpu`): the same sync as
tests/server/client/test_engine.py with the bytes moved by NCCL broadcast from the trainer's GPU to the server's.
NCCL refuses two ranks on one device, so those need two GPUs and are skipped otherwise (this
project's CI has none, so they have not run here; see docs/server.md)."""

import ast
import base64
import json
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorasync.server.transports import nccl as transport_nccl
from lorasync.server.transports import nccl_group as nccl
from lorasync.server.client.engine import ServerEngine
from lorasync.server.client.control import Pending, ServerSyncError
from lorasync.server.transports.nccl import pack, recv_records, send_records
from lorasync.server.transports.nccl_group import (
    UNIQUE_ID_BYTES,
    Meeting,
    join_workers,
    read_rendezvous,
    rendezvous,
)
from lorasync.server.transports.wire import Deadline, PayloadError, check_payload, manifest
from lorasync.sync.base import Record
from lorasync.sync.verify import probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import TOKEN, Server, policy

CPU = torch.device("cpu")
LAYOUT = {"layers.0.proj.weight": (4, 6), "embed.weight": (5, 3), "layers.1.proj.weight": (6, 4)}


# --- an in-process stand-in for NCCL ---------------------------------------------------------


class Comm:
    """One rank's communicator of the stand-in: what `nccl_group.Communicator` offers the code.
    Non-blocking as that one: `broadcast` only enqueues (a receive completes once the sender's
    tensor is there, seen by `mark`), and `ready` turns true once every rank has joined."""

    def __init__(self, rank: int, world_size: int, peers: dict, fail_after: int | None = None) -> None:
        self.rank, self.world_size, self.peers = rank, world_size, peers
        self.inbox: queue.Queue = queue.Queue()
        self.pending: list[torch.Tensor] = []  # receives enqueued whose tensor has not come
        self.disabled = self.aborted = False
        self.fail_after = fail_after  # broadcasts that are enqueued before one raises
        self.enqueued = self.count = 0  # broadcasts enqueued, and finished
        self.error: str | None = None  # an error NCCL reports (ncclCommGetAsyncError)
        self.log: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def ready(self) -> bool:
        return len(self.peers) == self.world_size  # enqueueing a broadcast is done at once

    def async_error(self) -> str | None:
        return self.error

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        if self.disabled:
            raise RuntimeError("broadcast on an aborted NCCL communicator")  # as `Communicator`
        if self.fail_after is not None and self.enqueued >= self.fail_after:
            raise RuntimeError("NCCL error: remote process exited or there was a network error")
        self.log.append((tensor.dtype, tuple(tensor.shape)))
        self.enqueued += 1
        if self.rank == src:
            for rank, peer in list(self.peers.items()):
                if rank != src:
                    peer.inbox.put(tensor.clone())
            self.count += 1
        else:
            self.pending.append(tensor)

    def _progress(self) -> None:
        while self.pending:
            try:
                sent = self.inbox.get_nowait()
            except queue.Empty:
                return
            tensor = self.pending.pop(0)
            # NCCL is given (pointer, count, dtype) on each rank, no shape: they must agree
            assert (sent.dtype, sent.numel()) == (tensor.dtype, tensor.numel())
            tensor.view(-1).copy_(sent.reshape(-1))
            self.count += 1

    def mark(self, stream=None):
        """Whether every broadcast enqueued so far has finished (a CUDA event, on a GPU)."""
        target = self.enqueued

        def done() -> bool:
            self._progress()
            return self.count >= target

        return done

    def abort(self) -> None:
        self.aborted = self.disabled = True

    def destroy(self) -> None:
        self.disabled = True


class Hub:
    """Stand-in for NCCL's init: ranks meet by unique id. Like `ncclCommInitRankConfig` with
    blocking=0, a rank's communicator comes at once, and is `ready` once all `world_size`
    ranks have joined (never, if one does not come)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.groups: dict[bytes, dict] = {}
        self.joins: list[tuple[bytes, int, int]] = []
        self.devices: dict[int, int | None] = {}
        self.fail: dict[int, Exception] = {}  # rank -> raised instead of joining
        self.made: list[Comm] = []  # every communicator, in the order made

    def communicator(self, unique_id: bytes, rank: int, world_size: int, device: int | None) -> Comm:
        assert isinstance(unique_id, bytes) and len(unique_id) == UNIQUE_ID_BYTES
        with self.lock:
            self.joins.append((unique_id, rank, world_size))
            self.devices[rank] = device
            if rank in self.fail:
                raise self.fail[rank]
            group = self.groups.setdefault(unique_id, {"world_size": world_size, "ranks": {}})
            assert group["world_size"] == world_size and 0 <= rank < world_size
            assert rank not in group["ranks"], f"rank {rank} joined twice"
            comm = group["ranks"][rank] = Comm(rank, world_size, group["ranks"])
            self.made.append(comm)
        return comm


def deadline(seconds: float = 5.0) -> Deadline:
    """A receiver's deadline, as `serve/receiver.py` makes it from LORASYNC_TRANSFER_TIMEOUT."""
    fix = f"set LORASYNC_TRANSFER_TIMEOUT (seconds, now {seconds:g}) in the server's environment"
    return Deadline(seconds, fix)


@pytest.fixture
def hub(monkeypatch) -> Hub:
    """NCCL replaced: unique ids are random bytes, communicators meet in `Hub`."""
    hub = Hub()
    monkeypatch.setattr(transport_nccl, "mint_unique_id", lambda: secrets.token_bytes(UNIQUE_ID_BYTES))
    monkeypatch.setattr(nccl, "_communicator", hub.communicator)
    return hub


def parallel(rank: int, workers: int, dp_index: int = 0) -> SimpleNamespace:
    """The part of vLLM's ParallelConfig a worker's join reads."""
    return SimpleNamespace(world_size=workers, rank=rank, data_parallel_index=dp_index)


class FakeServer:
    """`Control` for one in-process server: its init route runs `nccl.join_workers` on every
    worker at once, as vLLM's collective_rpc does, and answers 500 with the first error."""

    def __init__(self, workers: int, timeout: float = 10, server_timeout: float = 10) -> None:
        self.workers, self.timeout, self.server_timeout = workers, timeout, server_timeout
        self.groups: list = []
        self.messages: list[dict] = []

    def start(self, url: str, path: str, **kwargs) -> Pending:
        return Pending(self, url, path, kwargs)

    def call(self, url: str, method: str, path: str, **kwargs):
        assert (method, path) == ("POST", "/init_weight_transfer_engine")
        body = json.loads(json.dumps(kwargs["json"]))  # what crosses HTTP: JSON, nothing else
        message = body["init_info"]["nccl"]
        self.messages.append(message)
        joins = [Call(join_workers, message, parallel(r, self.workers), deadline(self.server_timeout))
                 for r in range(self.workers)]
        for join in joins:
            join.thread.join()
        errors = [join.error for join in joins if join.error is not None]
        if errors:
            raise ServerSyncError(f"{url}{path} answered 500: {type(errors[0]).__name__}: {errors[0]}")
        self.groups = [join.result for join in joins]


class Call:
    """`fn(*args)` on a daemon thread (so that a wait left unbounded cannot hold the test run
    at exit either): its `result` or its `error` once `thread` has ended."""

    def __init__(self, fn, *args) -> None:
        self.result = self.error = None

        def run() -> None:
            try:
                self.result = fn(*args)
            except BaseException as err:  # reported by whoever joins the thread
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def bounded(fn, *args, limit: float = 3.0):
    """`fn(*args)`, its result or its exception; still running after `limit` s fails the
    test instead of hanging the run (the waits under test would never end without their
    deadline)."""
    call = Call(fn, *args)
    call.thread.join(limit)
    if call.thread.is_alive():
        pytest.fail(f"still waiting after {limit} s: this wait is not bounded")
    if call.error is not None:
        raise call.error
    return call.result


def records(dtype: torch.dtype = torch.bfloat16) -> list[Record]:
    """A lora record, a full one and another lora one, over `LAYOUT`."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    return [
        Record("layers.0.proj.weight", (rand(4, 2), rand(2, 6)), 0.5),
        Record("embed.weight", (rand(5, 3),)),
        # its a is not contiguous: sent as a contiguous copy
        Record("layers.1.proj.weight", (rand(6, 3), rand(4, 3).t()), 2.0),
    ]


# --- the rendezvous message ------------------------------------------------------------------


def test_the_rendezvous_message_is_json_and_round_trips():
    unique_id = secrets.token_bytes(UNIQUE_ID_BYTES)
    message = json.loads(json.dumps(rendezvous(unique_id, 3)))
    assert message == {
        "unique_id": base64.b64encode(unique_id).decode(),  # standard base64, not URL-safe
        "world_size": 4,
        "first_worker_rank": 1,
    }
    assert read_rendezvous(message) == Meeting(unique_id, 4, 1)
    assert unique_id.hex() not in repr(read_rendezvous(message))  # a capability: kept out of logs
    with pytest.raises(ValueError, match="128 bytes"):
        rendezvous(unique_id[:-1], 3)
    with pytest.raises(ValueError, match="at least one worker"):
        rendezvous(unique_id, 0)


UID = secrets.token_bytes(UNIQUE_ID_BYTES)
GOOD = rendezvous(UID, 2)


def changed(**fields) -> dict:
    return {**GOOD, **fields}


@pytest.mark.parametrize(
    "message, refusal",
    [
        ([GOOD], "must be a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "world_size"}, "expected"),
        (changed(master_address="10.0.0.1", master_port=29500), "unique id only"),  # the old store rendezvous
        (changed(unique_id=base64.b64encode(UID[:-1]).decode()), "exactly 128 bytes"),  # 127 bytes
        (changed(unique_id=base64.b64encode(UID + b"\0").decode()), "exactly 128 bytes"),  # 129 bytes
        (changed(unique_id=base64.b64encode(UID * 2).decode()), "128-byte NCCL unique id"),
        # 172 characters without padding
        (changed(unique_id=base64.b64encode(b"\1" * 129)[:172].decode()), "exactly 128 bytes"),
        (changed(unique_id=GOOD["unique_id"][:-2] + "B="), "exactly 128 bytes"),  # stray padding bits
        (changed(unique_id=GOOD["unique_id"][:-1] + "!"), "not standard base64"),
        (changed(unique_id="-" + GOOD["unique_id"][1:]), "not standard base64"),  # URL-safe alphabet
        (changed(unique_id="é" + GOOD["unique_id"][1:]), "not standard base64"),
        (changed(unique_id=list(UID)), "standard base64"),
        (changed(unique_id=None), "standard base64"),
        (changed(world_size=1), "at least 2"),
        (changed(world_size="3"), "world_size"),
        (changed(world_size=3.0), "world_size"),
        (changed(world_size=True), "world_size"),
        (changed(first_worker_rank=0), "first_worker_rank must be 1"),  # a worker as rank 0: sender
        (changed(first_worker_rank=2), "first_worker_rank must be 1"),
        (changed(first_worker_rank=True), "first_worker_rank must be 1"),
    ],
)
def test_the_receiver_refuses_a_malformed_rendezvous_before_calling_nccl(hub, message, refusal):
    with pytest.raises(PayloadError, match=refusal):
        join_workers(message, parallel(0, 2), deadline())
    assert hub.joins == []


def test_the_group_must_fit_the_server_and_each_worker_gets_its_own_rank(hub):
    meeting = read_rendezvous(GOOD)  # world size 3: a trainer and two workers
    assert [nccl.worker_rank(meeting, parallel(r, 2)) for r in range(2)] == [1, 2]
    with pytest.raises(PayloadError, match="must be 4"):
        join_workers(GOOD, parallel(0, 3), deadline())  # the server has 3 workers, the group room for 2
    with pytest.raises(PayloadError, match="must be 2"):
        join_workers(GOOD, parallel(0, 1), deadline())
    with pytest.raises(PayloadError, match="data-parallel"):
        join_workers(GOOD, parallel(0, 2, dp_index=1), deadline())  # would be rank 3 of 3
    assert hub.joins == []


# --- the join ----------------------------------------------------------------------------


def test_the_trainer_and_the_workers_join_by_the_unique_id_alone(hub):
    server = FakeServer(workers=2)
    group = transport_nccl.open_group(server, "http://server", 2, device=3)
    (message,) = server.messages
    unique_id = read_rendezvous(message).unique_id
    assert sorted(hub.joins) == [(unique_id, rank, 3) for rank in range(3)]
    assert (group.rank, [g.rank for g in server.groups]) == (0, [1, 2])
    # the trainer on the device its caller named (it joins on another thread, whose current
    # CUDA device is not the caller's); each worker on its own current one, as vLLM sets it
    assert hub.devices == {0: 3, 1: None, 2: None}


def test_no_store_no_pickle_on_the_nccl_path():
    """Nothing on the path reaches vLLM's store rendezvous (StatelessProcessGroup over a
    TCPStore, whose broadcast_obj unpickles) or pickle; the receiver joins through transports/nccl_group.py."""
    banned = {
        "StatelessProcessGroup", "TCPStore", "broadcast_obj", "stateless_init_process_group",
        "trainer_init", "worker_init_process_group", "pickle", "master_address", "master_port",
    }
    server = Path(nccl.__file__).parents[1]
    for module in ("transports/nccl_group.py", "transports/nccl.py", "serve/receiver.py"):
        tree = ast.parse((server / module).read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        used |= {a.name.split(".")[-1] for n in imports for a in n.names}
        used |= {n.module.split(".")[-1] for n in imports if isinstance(n, ast.ImportFrom) and n.module}
        used |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not used & banned, f"{module} uses {used & banned}"


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
@pytest.mark.parametrize(
    "workers, failure",
    [
        # the server answers at once with its worker's error: this process gives up then
        (1, "answered 500: RuntimeError: NCCL error: unhandled cuda error"),
        # the other worker waits for the group until the server's deadline, longer than the
        # client's: this process gives up at its own
        (2, "did not form the NCCL group: its time limit of 1 s passed"),
    ],
)
def test_a_worker_that_fails_to_join_fails_the_connection_in_bounded_time(hub, workers, failure):
    hub.fail[workers] = RuntimeError("NCCL error: unhandled cuda error")  # the last worker
    start = time.monotonic()
    with pytest.raises(ServerSyncError, match=failure):
        server = FakeServer(workers, timeout=1, server_timeout=1.5)
        bounded(transport_nccl.open_group, server, "http://server", workers, 0)
    assert time.monotonic() - start < 2
    assert hub.made[0].rank == 0 and hub.made[0].aborted  # this process left the group


def test_a_trainer_that_fails_to_join_says_so(hub):
    hub.fail[0] = RuntimeError("NCCL error: invalid usage")
    server = FakeServer(workers=1)
    with pytest.raises(ServerSyncError, match="this process could not join.*invalid usage"):
        transport_nccl.open_group(server, "http://server", 1, 0)
    assert server.messages == []  # the server was not asked to join: nothing is left waiting


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_workers_that_never_answer_fail_the_connection_after_the_timeout(hub):
    class Silent(FakeServer):
        def call(self, *args, **kwargs):
            time.sleep(3)

    start = time.monotonic()
    with pytest.raises(ServerSyncError, match="did not form the NCCL group: its time limit of 1 s passed"):
        bounded(transport_nccl.open_group, Silent(workers=1, timeout=1), "http://server", 1, 0)
    assert time.monotonic() - start < 2.5
    (trainer,) = hub.made
    assert trainer.aborted  # its join, non-blocking, is not left waiting in NCCL's init


def test_a_communicator_that_nccl_left_disabled_is_refused(hub, monkeypatch):
    """VLLM_DISABLE_PYNCCL builds the communicator disabled, without joining (as vLLM builds
    its PyNcclCommunicator, whose broadcasts would then do nothing): refused at once."""

    def disabled(unique_id, rank, world_size, device):
        comm = Comm(rank, world_size, {})
        comm.disabled = True
        return comm

    monkeypatch.setattr(nccl, "_communicator", disabled)
    with pytest.raises(RuntimeError, match="VLLM_DISABLE_PYNCCL"):
        join_workers(GOOD, parallel(0, 2), deadline())


# --- the records -------------------------------------------------------------------------


def test_records_travel_in_manifest_order_in_their_dtype(hub):
    server = FakeServer(workers=2)
    trainer = transport_nccl.open_group(server, "http://server", 2, device=0)
    sent_records = records()
    head = manifest(sent_records)
    assert [t.dtype for t in pack(sent_records)] == [torch.bfloat16] * 5
    assert [tuple(t.shape) for t in pack(sent_records)] == [
        tuple(s) for r in head["records"] for s in r["shapes"]
    ]
    sent = send_records(trainer, sent_records, CPU, None, deadline())
    assert all(t.is_contiguous() for t in sent)
    checked = check_payload(json.loads(json.dumps(head)), LAYOUT, torch.bfloat16, 1 << 20)
    for worker in server.groups:
        got = recv_records(worker, checked, torch.bfloat16, CPU, deadline())
        assert [(r.name, r.scale) for r in got] == [(r.name, r.scale) for r in sent_records]
        for mine, theirs in zip(sent_records, got):
            assert all(torch.equal(a, b) for a, b in zip(mine.tensors, theirs.tensors))
        assert worker.log == trainer.log  # the same (dtype, shape) broadcasts, in one order


def test_a_broadcast_failing_midway_leaves_nothing_loaded(hub, monkeypatch):
    """The receiver as vLLM drives it: the third of five broadcasts fails; it keeps nothing,
    loads nothing at phase 2, and its group refuses the next transfer (a closed
    communicator would skip the broadcasts silently and load uninitialized memory)."""
    from lorasync.server.serve import receiver

    server = FakeServer(workers=1)
    trainer = transport_nccl.open_group(server, "http://server", 1, device=0)
    (worker,) = server.groups
    worker.fail_after = 2
    engine = receiver.LoraTransferEngine.__new__(receiver.LoraTransferEngine)
    engine.layout, engine.dtype, engine.device, engine.max_bytes = LAYOUT, torch.bfloat16, CPU, 1 << 20
    engine.timeout = 5.0
    engine.group, engine._pending, engine.pristine = worker, None, {}
    loads = []
    monkeypatch.setattr(receiver, "reload_tensors", lambda *args: loads.append(args))
    update = receiver.Update(manifest=manifest(records()))
    send_records(trainer, records(), CPU, None, deadline())
    # the first record's two broadcasts finished, the second record's first failed
    with pytest.raises(PayloadError, match="failed after 1 of 3 records arrived.*closed"):
        engine.receive_weights(update)
    engine.finish_weight_update()
    assert loads == [] and engine.group.aborted
    with pytest.raises(PayloadError, match="closed.*connect again"):
        engine.receive_weights(update)
    with pytest.raises(PayloadError, match="closed"):
        send_records(worker, records(), CPU, None, deadline())


# --- on GPUs: the real thing --------------------------------------------------------------


def needs_gpu(test):
    """An NCCL test: needs two CUDA GPUs (NCCL refuses two ranks on one device: the trainer
    uses the first, the server the second), starts a real vLLM server."""
    no_gpu = pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="NCCL needs two CUDA GPUs: the trainer's and the server's"
    )
    return pytest.mark.gpu(pytest.mark.vllm(no_gpu(test)))


def test_transport_is_checked_before_any_server_is_contacted():
    with pytest.raises(ValueError, match="transport must be one of tcp, nccl"):
        ServerEngine("http://127.0.0.1:9", TOKEN, transport="rdma")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs no accelerator"):
            ServerEngine("http://127.0.0.1:9", TOKEN, transport="nccl")


@pytest.fixture(scope="module")
def server(tiny_model):
    """One GPU server on the second visible GPU, the trainer (this process) on the first (only
    GPU tests use it: they are marked `vllm` too)."""
    # no --enforce-eager: on a GPU, the reload must also be right under CUDA graphs
    gpu = Server(tiny_model("qwen2"), vllm_args=("--dtype", "float32", "--max-model-len", "512",
                                                 "--gpu-memory-utilization", "0.3"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")
    try:
        with pytest.MonkeyPatch.context() as env:  # the server's process inherits it
            env.setenv("CUDA_VISIBLE_DEVICES", visible[1] if len(visible) > 1 else "1")
            gpu.start()
        yield gpu.wait()
    finally:
        gpu.kill()


@needs_gpu
def test_nccl_factor_sync_gives_parity(server, tiny_model):
    trainer = policy(tiny_model("qwen2"), targets=["all-linear"], modules_to_save=["lm_head"])
    engine = ServerEngine(server.url, TOKEN, transport="nccl")
    sync = WeightSync(trainer, engine, "factors")
    probes = probe_sequences(engine.vocab_size)
    for _ in range(2):  # the second sync proves the group outlives one transfer
        report = sync()
        assert engine.served_versions() == [str(report.version)]
        assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    # the wire is the factors: far below the merged tensors
    assert engine.last_wire_bytes < report.bytes_sent * 1.1
    engine.close()


@needs_gpu
@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_nccl_refused_manifest_raises_in_bounded_time_and_keeps_the_version(
    server, tiny_model, monkeypatch
):
    """Refused by the client's own check (nothing is broadcast), then, with that check off,
    by the server: the broadcasts it never joins must not hang the client."""
    trainer = policy(tiny_model("qwen2"), targets=["all-linear"])
    engine = ServerEngine(server.url, TOKEN, transport="nccl", timeout=20)
    sync = WeightSync(trainer, engine, "factors")
    probes = probe_sequences(engine.vocab_size)
    report = sync()
    real = transport_nccl.manifest

    def wrong_scale(records, encoding="raw"):
        head = real(records, encoding)
        head["records"][0]["scale"] = "not a number"
        return head

    monkeypatch.setattr(transport_nccl, "manifest", wrong_scale)
    with pytest.raises(ServerSyncError, match="would refuse"):
        sync()
    monkeypatch.setattr(transport_nccl, "check_payload", lambda *args: None)
    start = time.monotonic()
    with pytest.raises(ServerSyncError, match="scale"):
        sync()
    assert time.monotonic() - start < 20 + 10
    assert engine.served_versions() == [str(report.version)]
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    monkeypatch.undo()
    with pytest.raises(ServerSyncError, match="make a new ServerEngine"):
        sync()
    engine.close()
    engine = ServerEngine(server.url, TOKEN, transport="nccl")  # a new group: syncs again
    WeightSync(trainer, engine, "factors")()
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    engine.close()
