"""The wire format refuses malformed, truncated and oversized payloads before anything is used."""

import json
import socket
import struct
import threading

import pytest
import torch

from lorasync.transfer import MAGIC, PayloadError, Record, recv_payload, send_payload

LAYOUT = {"w": (6, 4), "v": (3,)}


def roundtrip(raw: bytes, max_bytes: int = 1 << 20):
    """Feed `raw` to the receiver through a real socket pair; return what it accepted."""
    a, b = socket.socketpair()
    writer = threading.Thread(target=lambda: (a.sendall(raw), a.shutdown(socket.SHUT_WR)))
    writer.start()
    try:
        return recv_payload(b, LAYOUT, torch.float32, max_bytes)
    finally:
        writer.join()
        a.close()
        b.close()


def encode(records) -> bytes:
    a, b = socket.socketpair()
    send_payload(a, records)
    a.close()
    chunks = []
    while chunk := b.recv(1 << 16):
        chunks.append(chunk)
    b.close()
    return b"".join(chunks)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_roundtrip_is_exact_and_smaller(dtype):
    records = [Record("w", ((0.02 * torch.randn(6, 2)).to(dtype), (0.02 * torch.randn(2, 4)).to(dtype)), 0.5)]
    a, b = socket.socketpair()
    sent = send_payload(a, records, compress=True)
    a.close()
    got = recv_payload(b, LAYOUT, dtype, 1 << 20)
    b.close()
    assert sent > 0
    for x, y in zip(records[0].tensors, got[0].tensors):
        assert torch.equal(x, y)


def test_corrupt_compressed_plane_is_refused():
    records = [Record("v", (torch.randn(3),))]
    a, b = socket.socketpair()
    send_payload(a, records, compress=True)
    a.close()
    raw = bytearray(b"".join(iter(lambda: b.recv(1 << 16), b"")))
    b.close()
    raw[-14] ^= 0xFF  # inside the zlib stream of the top byte plane
    with pytest.raises(PayloadError, match="compressed plane"):
        roundtrip(bytes(raw))
