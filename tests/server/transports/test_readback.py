"""The weight-level verdict on servers: `ServerEngine.read_back` (server/transports/readback.py).

Without vLLM: the read-back's format through a socket pair, bit for bit, and every header a
client refuses before it reads a byte of the tensor. With two real `lorasync serve` servers on
the tiny llama (started once for the module, in parallel): after a factor sync
`check_weights` passes within the merge's rounding with nothing unread; a change on the
trainer not synced is named, tensor by tensor, also by a slice (`only`) that reads just its
fused module; and a server that missed a sync the other took is caught. Each was seen to
fail with the code broken on purpose: the server's merge off by 10% in its scale; the
receiver leaving q_proj out of its read-back; `ServerEngine.read_back` reading the first
server alone; the receiver ignoring `only`.
"""

import json
import socket
import struct
import threading

import httpx
import pytest
import torch

from lorasync.served_model import TIED_HEAD
from lorasync.server.client.engine import ServerEngine
from lorasync.server.transports.readback import MAX_HEADER_BYTES, READ_BACK, ReadBackError, recv_tensors, send_tensors
from lorasync.server.transports.wire import Deadline, PayloadError
from lorasync.sync.weight_check import Expected, WeightCheck, check_weights, compare
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import TOKEN, bits, policy, train_step

LAYOUT = {"embed.weight": (4, 3), "norm.weight": (2,)}


class Recorder:
    """A socket stand-in that keeps what is sent."""

    def __init__(self) -> None:
        self.data = bytearray()

    def settimeout(self, seconds: float) -> None:
        pass

    def sendall(self, chunk) -> None:
        self.data += bytes(chunk)


def encoded(tensors) -> bytes:
    recorder = Recorder()
    assert send_tensors(recorder, tensors, Deadline(10, "")) == len(recorder.data)
    return bytes(recorder.data)


def frame(head) -> bytes:
    data = json.dumps(head).encode()
    return struct.pack("<Q", len(data)) + data


def received(raw: bytes, close: bool = True) -> list[tuple[str, torch.Tensor]]:
    """What `recv_tensors` visits when `raw` arrives through a real socket pair (left open
    after `raw` unless `close`: a refusal must not wait for bytes that never come)."""
    a, b = socket.socketpair()

    def write() -> None:
        try:
            a.sendall(raw)
            if close:
                a.shutdown(socket.SHUT_WR)
        except OSError:  # refused early: the reader closed its end
            pass

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    try:
        recv_tensors(b, LAYOUT, lambda name, t: seen.append((name, t.clone())), Deadline(10, ""))
        return seen
    finally:
        b.close()
        writer.join()
        a.close()


def test_a_read_back_arrives_bit_for_bit_in_order():
    sent = [
        ("embed.weight", torch.randn(4, 3)),
        ("norm.weight", torch.randn(2).to(torch.bfloat16)),
        (TIED_HEAD + "embed.weight", torch.randn(4, 3).T.contiguous().T),  # not contiguous
    ]
    got = received(encoded(sent))
    assert [n for n, _ in got] == [n for n, _ in sent]
    for (_, want), (_, have) in zip(sent, got):
        assert have.dtype == want.dtype and torch.equal(bits(have), bits(want))


TENSOR = frame({"name": "norm.weight", "dtype": "float32", "shape": [2]}) + bytes(8)


@pytest.mark.parametrize(
    "raw, error, match",
    [
        (struct.pack("<Q", MAX_HEADER_BYTES + 1), ReadBackError, "over the limit"),
        (frame({"name": "other.weight", "dtype": "float32", "shape": [2]}), ReadBackError, "not a tensor of"),
        (TENSOR + TENSOR, ReadBackError, "sent twice"),
        # more elements than the checkpoint's: refused before a byte of it (none are sent)
        (frame({"name": "embed.weight", "dtype": "float32", "shape": [1000, 1000]}), ReadBackError, "holds more"),
        (frame({"name": "norm.weight", "dtype": "int8", "shape": [2]}), ReadBackError, "dtype"),
        (frame({"name": "norm.weight", "dtype": "float32", "shape": [True, 2]}), ReadBackError, "shape"),
        (frame({"name": "norm.weight", "dtype": "float32"}), ReadBackError, "name, dtype and shape"),
        (frame([1, 2]), ReadBackError, "name, dtype and shape"),
        (struct.pack("<Q", 3) + b"{no", ReadBackError, "not valid JSON"),
        (TENSOR + frame({"count": 2}), ReadBackError, "declares 2 tensors, 1 were sent"),
    ],
    ids=["header-size", "unknown-name", "twice", "too-large", "dtype", "bool-shape", "fields",
         "not-object", "json", "count"],
)
def test_a_bad_read_back_is_refused_before_its_tensor_is_read(raw, error, match):
    with pytest.raises(error, match=match):
        received(raw, close=False)  # the stream stays open: a check that waited would time out


@pytest.mark.parametrize(
    "raw, match",
    [
        (TENSOR[:-3], "truncated"),  # cut inside a tensor
        (TENSOR, "truncated"),  # no count
        (TENSOR + frame({"count": 1}) + b"\0", "follow the read-back's count"),
    ],
    ids=["cut-tensor", "no-count", "trailing"],
)
def test_a_read_back_cut_short_or_running_on_is_refused(raw, match):
    with pytest.raises(PayloadError, match=match):
        received(raw)


# --- real servers ------------------------------------------------------------------------------


SERVER_MODEL = "llama"  # the `servers` fixture's (tests/server/conftest.py)


@pytest.fixture
def trainer(tiny_model):
    return policy(tiny_model("llama"), targets=["all-linear"])


def check_on(sync: WeightSync, index: int) -> WeightCheck:
    """`check_weights(sync)` on one server of its engine (`read_back_on`)."""
    engine = sync.engine
    expected = Expected(sync.merger, sync.plan.full, sync.last_strategy, engine.dtype)
    return compare(lambda visit: engine.read_back_on(index, visit), expected, False, len(sync.plan.full))


@pytest.mark.vllm
def test_after_a_factor_sync_every_server_holds_the_policy(servers, trainer):
    """Both servers read back whole (0 unread), within the merge's rounding (the servers
    merge): each server's 21 tensors, for a read-back the size of the checkpoint."""
    engine = ServerEngine([s.url for s in servers], TOKEN)
    sync = WeightSync(trainer, engine, "factors")
    train_step(trainer)
    sync()
    check = check_weights(sync)
    assert check.ok, check.describe()
    assert not check.exact and check.unread == 0
    layout = engine.checkpoint_layout()
    assert check.tensors == 2 * len(layout) == 42
    checkpoint = sum(4 * torch.Size(s).numel() for s in layout.values())  # float32
    assert checkpoint < engine.read_back_on(1, lambda name, t: None) < checkpoint + 100 * len(layout)
    # the mode is checked on the server, before anything is read or sent
    answer = httpx.post(f"{servers[0].url}/init_weight_transfer_engine", headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"init_info": {"mode": READ_BACK + "s", "host": "127.0.0.1", "port": 1, "nonce": "00"}})
    assert answer.status_code == 500 and "mode must be one of info, read_back" in answer.text
    engine.close()


@pytest.mark.vllm
def test_a_change_the_servers_were_not_sent_is_named(servers, trainer):
    """One layer's q_proj lora_B moves on the trainer after the sync: the verdict names that
    layer's q_proj weight, on each server, and nothing else (k and v, fused with q, agree)."""
    engine = ServerEngine([s.url for s in servers], TOKEN)
    sync = WeightSync(trainer, engine, "factors")
    sync()
    assert check_weights(sync).ok
    with torch.no_grad():
        trainer.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.add_(0.01)
    q = "model.layers.1.self_attn.q_proj.weight"
    check = check_weights(sync)
    assert check.first_mismatch == q
    assert check.mismatches == 2  # one tensor, on both servers
    # a slice (what training checks after each sync): only its fused module crosses the wire
    check = check_weights(sync, only=[q])
    assert (check.tensors, check.mismatches, check.first_mismatch, check.unread) == (2, 2, q, 0)
    read = []
    engine.read_back_on(0, lambda name, t: read.append(name), only=[q])
    assert read == [q, q.replace("q_proj", "k_proj"), q.replace("q_proj", "v_proj")]
    sync()
    assert check_weights(sync).ok
    engine.close()


@pytest.mark.vllm
def test_a_server_that_missed_a_sync_is_caught(servers, trainer):
    """Both servers take a sync; then only the first takes the next one (another client of it
    alone). The verdict over both counts the second's stale tensors: every LoRA-adapted one
    (7 linear modules x 2 layers), and checked one server at a time, only the second fails."""
    urls = [s.url for s in servers]
    engine = ServerEngine(urls, TOKEN)
    sync = WeightSync(trainer, engine, "factors")
    sync()
    train_step(trainer)
    first = ServerEngine(urls[0], TOKEN)
    WeightSync(trainer, first, "factors")()
    check = check_weights(sync)
    assert not check.ok and check.tensors == 42
    assert check.mismatches == 14, check.describe()
    each = [check_on(sync, i) for i in range(len(urls))]
    assert [c.ok for c in each] == [True, False]
    assert each[1].mismatches == 14 and each[1].first_mismatch == check.first_mismatch
    sync()
    assert check_weights(sync).ok
    first.close()
    engine.close()
