"""The NCCL group's deadlines (issue #27): a join and a whole transfer are each bounded by the
receiver's transfer deadline (LORASYNC_TRANSFER_TIMEOUT), and on expiry or on an error NCCL
reports, the communicator is aborted and the error says what happened and how far it got.

Driven through the in-process stand-in of tests/server/transports/test_nccl.py (`Hub`,
`Comm`: non-blocking, as `nccl_group.Communicator`). Each wait runs under `bounded`, so that a
wait left unbounded fails the test instead of hanging the run. The real communicator
(`ncclCommInitRankConfig` with blocking=0, `ncclCommGetAsyncError`, `ncclCommAbort`) needs
GPUs: the `gpu` tests of test_nccl.py."""

import json
import secrets
import threading
import time

import pytest
import torch

from lorasync.server.transports.nccl import recv_records, send_records
from lorasync.server.transports.nccl_group import UNIQUE_ID_BYTES, join_workers, read_rendezvous, rendezvous
from lorasync.server.transports.wire import PayloadError, check_payload, manifest
from tests.server.transports.test_nccl import CPU, LAYOUT, bounded, deadline, hub, parallel, records  # noqa: F401

NETWORK_ERROR = "remote process exited or there was a network error"


def group(hub, workers: int = 1):
    """A formed group: the trainer's communicator (rank 0) and its workers' (joined)."""
    message = rendezvous(secrets.token_bytes(UNIQUE_ID_BYTES), workers)
    trainer = hub.communicator(read_rendezvous(message).unique_id, 0, 1 + workers, 0)
    return trainer, [bounded(join_workers, message, parallel(r, workers), deadline()) for r in range(workers)]


def checked():
    return check_payload(json.loads(json.dumps(manifest(records()))), LAYOUT, torch.bfloat16, 1 << 20)


# --- the join ----------------------------------------------------------------------------


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_a_worker_whose_trainer_never_joins_gives_up_at_the_deadline(hub):
    message = rendezvous(secrets.token_bytes(UNIQUE_ID_BYTES), 1)  # no trainer will come
    start = time.monotonic()
    with pytest.raises(PayloadError) as caught:
        bounded(join_workers, message, parallel(0, 1), deadline(0.5))
    assert 0.5 <= time.monotonic() - start < 1.5  # the deadline, and a little slack
    text = str(caught.value)
    assert "rank 1 of 2) could not join the NCCL group: its time limit of 0.5 s passed" in text
    assert "set LORASYNC_TRANSFER_TIMEOUT (seconds, now 0.5) in the server's environment" in text
    assert "connect again" in text
    (worker,) = hub.made
    assert worker.aborted  # not left waiting in NCCL's init


def test_an_error_nccl_reports_while_joining_fails_the_join_at_once(hub, monkeypatch):
    from lorasync.server.transports import nccl_group

    def failing(*args):
        comm = hub.communicator(*args)
        comm.error = "unhandled system error (run with NCCL_DEBUG=INFO for details)"
        return comm

    monkeypatch.setattr(nccl_group, "_communicator", failing)
    message = rendezvous(secrets.token_bytes(UNIQUE_ID_BYTES), 1)
    with pytest.raises(PayloadError, match="could not join the NCCL group: NCCL reported: unhandled system error"):
        bounded(join_workers, message, parallel(0, 1), deadline(60), limit=2)  # not the deadline
    assert hub.made[0].aborted


# --- a transfer --------------------------------------------------------------------------


def test_the_worker_waits_for_broadcasts_that_come_later(hub):
    """The happy path, the trainer sending after the worker began to wait: every record
    arrives, in order, and nothing is aborted."""
    trainer, (worker,) = group(hub)
    sent = records()
    threading.Timer(0.2, lambda: send_records(trainer, sent, CPU, None, deadline())).start()
    got = bounded(recv_records, worker, checked(), torch.bfloat16, CPU, deadline())
    assert [r.name for r in got] == [r.name for r in sent]
    for mine, theirs in zip(sent, got):
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors, theirs.tensors))
    assert not worker.aborted and not trainer.aborted


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_a_trainer_that_dies_mid_transfer_fails_the_receive_at_the_deadline(hub):
    """Through the receiver as vLLM drives it: one record of three comes, then nothing; the
    update fails at the server's deadline naming what arrived, the communicator is aborted,
    and the next NCCL update says to connect again."""
    from lorasync.server.serve import receiver

    trainer, (worker,) = group(hub)
    engine = receiver.LoraTransferEngine.__new__(receiver.LoraTransferEngine)
    engine.layout, engine.dtype, engine.device, engine.max_bytes = LAYOUT, torch.bfloat16, CPU, 1 << 20
    engine.group, engine._pending, engine.pristine, engine.timeout = worker, None, {}, 0.5
    update = receiver.Update(manifest=manifest(records()))
    send_records(trainer, records()[:1], CPU, None, deadline())  # then the trainer dies
    start = time.monotonic()
    with pytest.raises(PayloadError) as caught:
        bounded(engine.receive_weights, update)
    assert 0.5 <= time.monotonic() - start < 1.5  # the deadline, and a little slack
    text = str(caught.value)
    assert "failed after 1 of 3 records arrived: its time limit of 0.5 s passed" in text
    assert "LORASYNC_TRANSFER_TIMEOUT (seconds, now 0.5)" in text and "group is closed" in text
    assert worker.aborted and engine._pending is None
    with pytest.raises(PayloadError, match="closed.*connect again"):
        engine.receive_weights(update)


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_an_error_nccl_reports_during_a_transfer_fails_it_at_once(hub):
    trainer, (worker,) = group(hub)
    send_records(trainer, records()[:2], CPU, None, deadline())  # two records of three, then
    threading.Timer(0.2, lambda: setattr(worker, "error", NETWORK_ERROR)).start()  # the link fails
    start = time.monotonic()
    with pytest.raises(PayloadError, match=f"failed after 2 of 3 records arrived: NCCL reported: {NETWORK_ERROR}"):
        bounded(recv_records, worker, checked(), torch.bfloat16, CPU, deadline(60))
    assert time.monotonic() - start < 1.5  # not the deadline's 60 s
    assert worker.aborted
