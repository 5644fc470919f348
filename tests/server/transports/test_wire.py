"""The wire format refuses malformed, truncated, oversized and too slow payloads before anything
is used; a stream declared first is written as it is read. (What the client bounds in the
handshake: test_tcp.py and tests/server/client/test_control.py.)"""

import json
import re
import socket
import struct
import threading
import time

import pytest
import torch

from lorasync.server.transports.wire import MAGIC, Deadline, PayloadError, recv_payload, send_payload
from lorasync.sync.base import Record
from tests import helpers
from tests.helpers import DEADLINE_FIX, bits, transfer_bytes

LAYOUT = {"w": (6, 4), "v": (3,), "big": (512, 256)}
FIX = DEADLINE_FIX


def roundtrip(raw: bytes, max_bytes: int = 1 << 20, dtype: torch.dtype = torch.float32, layout=LAYOUT,
              seconds: float = 10.0):
    return helpers.roundtrip(raw, layout, max_bytes, dtype, seconds)


def good_records():
    return [
        Record("w", (torch.randn(6, 2), torch.randn(2, 4)), 0.5),
        Record("v", (torch.randn(3),)),
    ]


def raw_with(head: dict, body: bytes = b"") -> bytes:
    text = json.dumps(head).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + body


def test_roundtrip_is_exact():
    records = good_records()
    got = roundtrip(transfer_bytes(records))
    assert [r.name for r in got] == ["w", "v"] and got[0].scale == 0.5
    for sent, received in zip(records, got):
        for x, y in zip(sent.tensors, received.tensors):
            assert torch.equal(x, y)


def test_an_empty_transfer_is_taken_whatever_the_servers_dtype():
    """`manifest` declares float32 when there is no tensor to take a dtype from."""
    assert roundtrip(transfer_bytes([]), dtype=torch.bfloat16) == []


def test_truncated_payload_is_refused():
    raw = transfer_bytes(good_records())
    with pytest.raises(PayloadError, match="truncated"):
        roundtrip(raw[:-5])


def test_trailing_bytes_are_refused():
    with pytest.raises(PayloadError, match="oversized"):
        roundtrip(transfer_bytes(good_records()) + b"\0" * 8)


def test_payload_over_the_limit_is_refused_before_reading_it():
    raw = transfer_bytes(good_records())
    with pytest.raises(PayloadError, match="over the server's limit"):
        roundtrip(raw, max_bytes=16)


@pytest.mark.parametrize(
    "head,message",
    [
        ({"dtype": "float32", "records": [{"name": "nope", "kind": "full", "shapes": [[3]]}]}, "not a tensor"),
        ({"dtype": "bfloat16", "records": [{"name": "v", "kind": "full", "shapes": [[3]]}]}, "dtype"),
        ({"dtype": "float32", "records": [{"name": "v", "kind": "full", "shapes": [[4]]}]}, "full tensor shapes"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": 1.0, "shapes": [[6, 5], [5, 4]]}]}, "do not fit"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": "x", "shapes": [[6, 2], [2, 4]]}]}, "numeric 'scale'"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": float("nan"), "shapes": [[6, 2], [2, 4]]}]}, "finite numeric 'scale'"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": float("inf"), "shapes": [[6, 2], [2, 4]]}]}, "finite numeric 'scale'"),
        ({"dtype": "float32", "records": [{"name": "v", "kind": "full", "shapes": [[-3]]}]}, "positive ints"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": 1.0, "shapes": [[6, True], [True, 4]]}]}, "positive ints"),
        ({"dtype": "float32", "encoding": "zlib", "records": []}, "encoding must be one of"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": 1e39, "shapes": [[6, 2], [2, 4]]}]}, r"\|scale\| <= 3\.40282e\+38"),
        ({"dtype": "float32", "records": [{"name": "v", "kind": "full", "shapes": [[3]]}] * 2}, "sent twice"),
        ({"dtype": "float32", "records": [{"name": "v", "kind": "delta", "shapes": [[3]]}]}, "kind must be"),
        ({"records": "all"}, "'records' list"),
    ],
)
def test_malformed_manifest_is_refused(head, message):
    with pytest.raises(PayloadError, match=message):
        roundtrip(raw_with(head, b"\0" * 1024))


def test_bad_magic_and_bad_json_are_refused():
    with pytest.raises(PayloadError, match="bad magic"):
        roundtrip(b"GARBAGE" + b"\0" * 64)
    with pytest.raises(PayloadError, match="not valid JSON"):
        roundtrip(MAGIC + struct.pack("<Q", 3) + b"{x}")
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError, not a payload error
    with pytest.raises(PayloadError, match="not valid JSON: RecursionError"):
        roundtrip(MAGIC + struct.pack("<Q", len(deep)) + deep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_roundtrip_is_exact_and_smaller(dtype):
    """LoRA-factor-like values (small, a few exponents in the top byte) plus the values a
    lossy or sign-dropping plane would get wrong: -0.0, infinities, NaN, subnormals."""
    special = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 3.0])
    b = (0.02 * torch.randn(512, 16)).to(dtype)
    b.view(-1)[: len(special)] = special.to(dtype)
    records = [Record("big", (b, (0.02 * torch.randn(16, 256)).to(dtype)), 0.5), Record("v", (special[:3].to(dtype),))]
    raw, compressed = transfer_bytes(records), transfer_bytes(records, compress=True)
    got = roundtrip(compressed, dtype=dtype)
    assert [(r.name, r.scale) for r in got] == [("big", 0.5), ("v", None)]
    for sent, received in zip(records, got):
        for x, y in zip(sent.tensors, received.tensors):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))
    # the top byte plane of small trained values packs well: a third of it or less in bf16
    ratio = len(compressed) / len(raw)
    assert ratio < {torch.float32: 0.95, torch.bfloat16: 0.8}[dtype], ratio


def test_corrupt_compressed_plane_is_refused():
    records = [Record("v", (torch.randn(3),))]
    raw = bytearray(transfer_bytes(records, compress=True))
    raw[-14] ^= 0xFF  # inside the zlib stream of the top byte plane
    with pytest.raises(PayloadError, match="compressed plane"):
        roundtrip(bytes(raw))


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_one_deadline_bounds_the_whole_transfer_of_a_trickling_sender():
    """A byte every 0.05 s: no single read waits the 0.5 s limit, so a timeout per read would
    wait as long as the sender trickles (here 3 s, then it stops: "truncated")."""
    raw = transfer_bytes(good_records())
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def trickle() -> None:
            with socket.create_connection(listener.getsockname()) as out:
                for i in range(60):
                    if stop.wait(0.05):
                        return
                    try:
                        out.sendall(raw[i : i + 1])
                    except OSError:  # the receiver gave up and closed
                        return

        sender = threading.Thread(target=trickle)
        sender.start()
        conn, _ = listener.accept()
    start = time.monotonic()
    try:
        with conn, pytest.raises(PayloadError, match=r"time limit of 0\.5 s") as err:
            recv_payload(conn, LAYOUT, torch.float32, 1 << 20, Deadline(0.5, FIX))
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        sender.join()
    assert elapsed < 1.5, elapsed
    arrived = int(re.search(r"(\d+) bytes arrived", str(err.value)).group(1))
    assert 0 < arrived < 60 and FIX in str(err.value)


@pytest.mark.timing  # asserts on wall-clock time: outside the fast tier, run alone
def test_the_deadline_covers_the_wait_for_the_end_of_the_stream():
    """The whole payload, then the sender neither sends more nor closes."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(transfer_bytes(good_records()))
        start = time.monotonic()
        with pytest.raises(PayloadError, match="still reading the end of the stream"):
            recv_payload(b, LAYOUT, torch.float32, 1 << 20, Deadline(0.3, FIX))
        assert time.monotonic() - start < 1.3


# --- streams: records computed as they are read, declared first -------------------------------


def declared_as_meta(records):
    return [Record(r.name, tuple(t.to("meta") for t in r.tensors), r.scale) for r in records]


@pytest.mark.parametrize("compress", [False, True])
def test_a_stream_declared_first_is_written_as_it_is_read(compress):
    """The bytes are those of the list, and each record is written before the next is read
    (what lets a merged sync hold one tensor at a time). Checked able to fail: with
    `send_payload` reading the stream whole first, no record finds its predecessor's bytes
    already written."""
    records = good_records()
    sock = helpers._Recorder()
    written_before = []

    def stream():
        for record in records:
            written_before.append(len(sock.data))
            yield record

    send_payload(sock, stream(), compress, declared=declared_as_meta(records))
    assert bytes(sock.data) == transfer_bytes(records, compress)
    assert written_before[0] < written_before[1] < len(sock.data)


@pytest.mark.parametrize(
    "stray, message",
    [
        (lambda rs: [rs[1], rs[0]], "declared .'w'"),  # out of order
        (lambda rs: [rs[0], Record("v", (torch.randn(4),))], r"\(4,\)"),  # another shape
        (lambda rs: [rs[0], Record("v", (torch.randn(3, dtype=torch.float64),))], "float64"),
        (lambda rs: rs[:1], "ended after 1"),  # short
        (lambda rs: rs + rs[1:], "no more records"),  # long
    ],
    ids=["order", "shape", "dtype", "short", "long"],
)
def test_a_stream_that_strays_from_its_declaration_is_refused_and_what_went_is_cut_short(stray, message):
    """The client raises, naming the record, before writing any of its bytes. What went is
    cut short, which the receiver refuses, except when every declared record went (long):
    the transport then resets the streams (`_abandon`: test_tcp.py)."""
    records = good_records()
    sock = helpers._Recorder()
    with pytest.raises(ValueError, match=message):
        send_payload(sock, iter(stray(records)), declared=declared_as_meta(records))
    if len(stray(records)) > len(records):
        assert bytes(sock.data) == transfer_bytes(records)
    else:
        with pytest.raises(PayloadError, match="truncated"):
            roundtrip(bytes(sock.data))
