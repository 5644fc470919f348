"""The wire format refuses malformed, truncated and oversized payloads before anything is used."""

import json
import socket
import struct
import threading

import pytest
import torch

from lorasync.server.wire import MAGIC, PayloadError, recv_payload, send_payload
from lorasync.sync.base import Record

LAYOUT = {"w": (6, 4), "v": (3,), "big": (512, 256)}


def roundtrip(raw: bytes, max_bytes: int = 1 << 20, dtype: torch.dtype = torch.float32):
    """Feed `raw` to the receiver through a real socket pair; return what it accepted."""
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (a.sendall(raw), a.shutdown(socket.SHUT_WR)))
    writer.start()
    try:
        return recv_payload(b, LAYOUT, dtype, max_bytes)
    finally:
        writer.join()
        a.close()
        b.close()


def encode(records, compress: bool = False) -> bytes:
    """What `send_payload` writes for `records` (a real socket pair, read as it is written)."""
    a, b = socket.socketpair()
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: b.recv(1 << 16), b"")))
    reader.start()
    sent = send_payload(a, records, compress=compress)
    a.close()
    reader.join()
    b.close()
    raw = b"".join(chunks)
    assert sent == len(raw)  # it reports what it wrote
    return raw


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare bit for bit (torch.equal takes -0.0 for 0.0 and NaN for
    nothing)."""
    return t.contiguous().view(torch.uint8)


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
    got = roundtrip(encode(records))
    assert [r.name for r in got] == ["w", "v"] and got[0].scale == 0.5
    for sent, received in zip(records, got):
        for x, y in zip(sent.tensors, received.tensors):
            assert torch.equal(x, y)


def test_truncated_payload_is_refused():
    raw = encode(good_records())
    with pytest.raises(PayloadError, match="truncated"):
        roundtrip(raw[:-5])


def test_trailing_bytes_are_refused():
    with pytest.raises(PayloadError, match="oversized"):
        roundtrip(encode(good_records()) + b"\0" * 8)


def test_payload_over_the_limit_is_refused_before_reading_it():
    raw = encode(good_records())
    with pytest.raises(PayloadError, match="over the server's limit"):
        roundtrip(raw, max_bytes=16)


@pytest.mark.parametrize(
    "head,message",
    [
        ({"dtype": "float32", "records": [{"name": "nope", "kind": "full", "shapes": [[3]]}]}, "not a tensor"),
        ({"dtype": "bfloat16", "records": []}, "dtype"),
        ({"dtype": "float32", "records": [{"name": "v", "kind": "full", "shapes": [[4]]}]}, "full tensor shapes"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": 1.0, "shapes": [[6, 5], [5, 4]]}]}, "do not fit"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": "x", "shapes": [[6, 2], [2, 4]]}]}, "numeric 'scale'"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": float("nan"), "shapes": [[6, 2], [2, 4]]}]}, "finite numeric 'scale'"),
        ({"dtype": "float32", "records": [{"name": "w", "kind": "lora", "scale": float("inf"), "shapes": [[6, 2], [2, 4]]}]}, "finite numeric 'scale'"),
        ({"dtype": "float32", "records": [{"name": "v", "kind": "full", "shapes": [[-3]]}]}, "positive ints"),
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
    raw, compressed = encode(records), encode(records, compress=True)
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
    raw = bytearray(encode(records, compress=True))
    raw[-14] ^= 0xFF  # inside the zlib stream of the top byte plane
    with pytest.raises(PayloadError, match="compressed plane"):
        roundtrip(bytes(raw))
