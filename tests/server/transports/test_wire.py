"""The wire format refuses malformed, truncated, oversized and too slow payloads before anything
is used, and the client bounds what a server declares to it."""

import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lorasync.server.client.control import MAX_RESPONSE_BYTES, Control, ServerSyncError
from lorasync.server.transports import tcp as transport_tcp
from lorasync.server.transports.tcp import BrokenStream, Fanout, TcpTransport
from lorasync.server.transports.wire import MAGIC, MAX_INFO_BYTES, Deadline, PayloadError, recv_payload, send_payload
from lorasync.sync.base import Record, WeightStream
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


def fake_server(reply: bytes, models: bytes = b'{"data": [{"id": "m"}]}') -> ThreadingHTTPServer:
    """A stand-in for a server's handshake on loopback: on POST it connects back to the
    client's listener, proves the nonce, then sends `reply` where a real server's info goes;
    GET answers `models` (chunked, as a streaming server would: no length announced)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(models), 1 << 16):
                piece = models[i : i + (1 << 16)]
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                except OSError:  # the client stopped reading
                    return
            self.wfile.write(b"0\r\n\r\n")

        def do_POST(self) -> None:
            endpoint = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["init_info"]
            with socket.create_connection((endpoint["host"], endpoint["port"])) as sock:
                try:
                    sock.sendall(MAGIC + bytes.fromhex(endpoint["nonce"]) + reply)
                except OSError:
                    pass
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # polled often: `shutdown()` waits up to one interval (0.5 s by default, per server)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.mark.parametrize(
    "reply,message",
    [
        (struct.pack("<Q", 1 << 62), f"declares {1 << 62} bytes of server info, over the client's limit of {MAX_INFO_BYTES}"),
        (struct.pack("<Q", 3) + b"{x}", "server info is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    ],
    ids=["huge", "bad-json", "not-an-object"],
)
def test_the_client_caps_and_checks_the_server_info_it_reads(reply, message):
    expect_handshake_error(fake_server(reply), message)


GOOD_INFO = {
    "layout": {"w": [2, 3]}, "groups": [["w"]], "dtype": "float32", "vocab_size": 8,
    "max_payload_bytes": 1 << 20, "workers": 1, "merge_kernel": "addmm",
}


def info_reply(info: dict) -> bytes:
    body = json.dumps(info).encode()
    return struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vocab_size": None}, "field 'vocab_size' must be a positive integer, got None"),
        ({"workers": 0}, "field 'workers' must be a positive integer, got 0"),
        ({"max_payload_bytes": "1"}, "field 'max_payload_bytes' must be a positive integer, got '1'"),
        ({"dtype": "float8"}, "field 'dtype' must be one of"),
        ({"layout": {"w": [2, -3]}}, "field 'layout' must be an object of names to shapes"),
        ({"layout": ["w"]}, "field 'layout' must be an object of names to shapes"),
        ({"groups": [["w", 1]]}, "field 'groups' must be a list of lists of names"),
        ({"merge_kernel": None}, "field 'merge_kernel' must be a string"),
    ],
    ids=["missing", "zero", "string-int", "dtype", "negative-size", "layout-list", "group-name", "kernel"],
)
def test_the_client_checks_every_field_of_the_server_info(change, message):
    """A field missing or of the wrong type is the server's error, naming the field and the
    value, not a KeyError or TypeError later. The good info passes (the check can pass)."""
    server = fake_server(info_reply(GOOD_INFO))
    url = f"http://127.0.0.1:{server.server_port}"
    control = Control("token", timeout=5)
    try:
        info = TcpTransport(control, "127.0.0.1", compress=False).handshake(url)
        assert (info.layout, info.model, info.dtype) == ({"w": (2, 3)}, "m", "float32")
    finally:
        control.close()
        server.shutdown()
        server.server_close()
    expect_handshake_error(fake_server(info_reply(GOOD_INFO | change)), message)


@pytest.mark.parametrize(
    "models,message",
    [
        (b"[" * 50 + b"x" * (2 << 20), f"the answer is over the client's limit of {MAX_RESPONSE_BYTES} bytes"),
        (b"{not json", "the answer is not JSON"),
        (b'{"data": []}', "no model id in"),
    ],
    ids=["huge", "bad-json", "no-model"],
)
def test_the_client_caps_and_checks_http_answers(models, message):
    """An answer to a control request is read to at most MAX_RESPONSE_BYTES, even when no
    length is announced, then checked: a server cannot make the client allocate what it
    likes, nor fail it with a KeyError."""
    expect_handshake_error(fake_server(info_reply(GOOD_INFO), models), message)


def expect_handshake_error(server: ThreadingHTTPServer, message: str) -> None:
    """The handshake with `server` raises ServerSyncError naming its URL and saying `message`."""
    url = f"http://127.0.0.1:{server.server_port}"
    control = Control("token", timeout=5)
    try:
        with pytest.raises(ServerSyncError, match=re.escape(message)) as err:
            TcpTransport(control, "127.0.0.1", compress=False).handshake(url)
        assert str(err.value).startswith(url)
    finally:
        control.close()
        server.shutdown()
        server.server_close()


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
    the transport then resets the streams (next test)."""
    records = good_records()
    sock = helpers._Recorder()
    with pytest.raises(ValueError, match=message):
        send_payload(sock, iter(stray(records)), declared=declared_as_meta(records))
    if len(stray(records)) > len(records):
        assert bytes(sock.data) == transfer_bytes(records)
    else:
        with pytest.raises(PayloadError, match="truncated"):
            roundtrip(bytes(sock.data))


def test_an_abandoned_transfer_is_reset_not_ended():
    """What a transfer broken off on the client's side leaves the receiver: a reset, where a
    plain close reads as the end of a complete payload. Checked able to fail: without the
    zero linger the peer reads b"" (the end of the stream)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours = listener.accept()[0]
    ours.sendall(b"all of it")
    transport_tcp._abandon([ours], [])
    assert theirs.recv(9) == b"all of it"
    with pytest.raises(ConnectionResetError):
        theirs.recv(1)
    theirs.close()


class _Broken:
    def sendall(self, data) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_fanout_writes_every_stream_and_names_the_one_that_broke():
    first, second = helpers._Recorder(), helpers._Recorder()
    Fanout([first, second]).sendall(b"abc")
    assert first.data == second.data == b"abc"
    with pytest.raises(BrokenStream) as broken:
        Fanout([first, _Broken(), second]).sendall(b"d")
    assert broken.value.index == 1 and isinstance(broken.value.error, BrokenPipeError)


def test_a_weight_stream_yields_what_it_named_in_order_and_refuses_anything_else():
    pairs = [("a", torch.ones(1)), ("b", torch.zeros(2))]
    doubled = WeightStream(["a", "b"], iter(pairs)).map(lambda t: t * 2)
    assert doubled.names == ["a", "b"]
    assert [(n, t.tolist()) for n, t in doubled] == [("a", [2.0]), ("b", [0.0, 0.0])]
    for names, message in [(["b", "a"], "tensor 0 is 'a', but it named 'b'"), (["a"], "named 'nothing more'"),
                           (["a", "b", "c"], "named 3 tensors, gave 2")]:
        with pytest.raises(ValueError, match=message):
            list(WeightStream(names, iter(pairs)))
