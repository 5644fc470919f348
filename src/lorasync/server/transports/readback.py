"""The wire format of a read-back: what a server's model holds, streamed tensor by tensor.

The weight-level verdict (`sync/weight_check.py`) compares, tensor by tensor, what an engine
holds with what the trainer's policy says. A server shows its weights through the same
token-guarded route and connection-back as the handshake: the client POSTs
`/init_weight_transfer_engine` with `{"init_info": {"mode": "read_back", "host", "port",
"nonce"}}` (and `"only": [checkpoint names]` to read just the modules holding those), and the
receiver (`serve/receiver.py`) reads its model back under checkpoint names
(`engines/readback.read_back`, linear weights through their kernels) and writes, one tensor
at a time, to the stream it opens to that address:

    receiver -> client:  MAGIC, 32-byte nonce (from the request)
                         per tensor: u64 header length, header (JSON: {"name", "dtype",
                                     "shape"}), the tensor's bytes (raw, little-endian)
                         u64 length, {"count": N} (the number of tensors), end of stream

Each is read in the order `engines/readback.py` yields them (its unread tensors are not
sent). The client checks every header before reading a byte of its tensor: at most
MAX_HEADER_BYTES, a name of its checkpoint (or `checkpoint.TIED_HEAD` + one) not sent
before, a dtype of `checkpoint.DTYPES`, a shape of at most as many elements as that
checkpoint tensor; and that the count matches and nothing follows. So a server can make the
client hold at most one tensor of its checkpoint's size. Raw bytes, no compression: this is
a check, run every few syncs; it costs the served model's bytes per server (docs/server.md).

Used by both halves of `tcp.py` (`TcpTransport.read_back`, `send_model`), so it imports
neither side.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from collections.abc import Callable, Iterable, Mapping

import torch

from lorasync.served_model import DTYPES, TIED_HEAD, dtype_name
from lorasync.server.transports.wire import Deadline, PayloadError, at_end, recv_exact, tensor_bytes

# The `mode` of an `/init_weight_transfer_engine` request: report what the server serves (the
# handshake, the default), or stream what its model holds.
INFO, READ_BACK = "info", "read_back"
MODES = (INFO, READ_BACK)
MAX_HEADER_BYTES = 64 << 10  # a header is a name, a dtype and a shape: ~100 bytes


class ReadBackError(PayloadError):
    """A read-back broke its format: the server sent what the client refuses to read."""


def send_tensors(sock: socket.socket, tensors: Iterable[tuple[str, torch.Tensor]], deadline: Deadline) -> int:
    """Write each (name, tensor) of `tensors` as it comes, then the count; return the bytes.
    One tensor's bytes are held at a time. Every write obeys `deadline` (the whole stream's)."""
    sent = count = 0
    for name, tensor in tensors:
        head = json.dumps({"name": name, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)})
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # flat: 0-d has no bytes view
        sent += _send(sock, _framed(head), deadline, name) + _send(sock, memoryview(data), deadline, name)
        count += 1
    return sent + _send(sock, _framed(json.dumps({"count": count})), deadline, "the count")


def _framed(head: str) -> bytes:
    data = head.encode()
    return struct.pack("<Q", len(data)) + data


def _send(sock: socket.socket, data, deadline: Deadline, what: str) -> int:
    """sendall within what is left of `deadline` (a stalled reader cannot hold the server)."""
    sock.settimeout(deadline.left(what))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise deadline.expired(what) from None
    return len(data)


def recv_tensors(
    sock: socket.socket, layout: Mapping[str, tuple[int, ...]], visit: Callable[[str, torch.Tensor], None],
    deadline: Deadline,
) -> int:
    """Read one read-back, calling `visit(name, tensor)` for each tensor as it arrives (the
    tensor is this function's: keep it or not); return the bytes read. ReadBackError for what
    breaks the format, PayloadError (from `wire.recv_exact`) for a stream cut short."""
    received, seen = 0, set()
    while True:
        (length,) = struct.unpack("<Q", recv_exact(sock, 8, "read-back header length", deadline))
        if length > MAX_HEADER_BYTES:
            raise ReadBackError(f"read-back header of {length} bytes, over the limit of {MAX_HEADER_BYTES}")
        try:
            head = json.loads(bytes(recv_exact(sock, length, "read-back header", deadline)))
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8; deep nesting
            raise ReadBackError(f"read-back header is not valid JSON ({type(err).__name__}: {err})"[:300]) from None
        received += 8 + length
        if isinstance(head, dict) and set(head) == {"count"}:
            if head["count"] != len(seen):
                raise ReadBackError(f"read-back declares {head['count']!r} tensors, {len(seen)} were sent")
            break
        name, dtype, shape = _check(head, layout, seen)
        size = tensor_bytes(shape, dtype)
        data = recv_exact(sock, size, f"read-back tensor {name}", deadline)
        received += size
        visit(name, torch.frombuffer(data, dtype=dtype).view(shape) if size else torch.empty(shape, dtype=dtype))
    if not at_end(sock, "the end of the read-back", deadline):
        raise ReadBackError("bytes follow the read-back's count")
    return received


def _check(head, layout: Mapping[str, tuple[int, ...]], seen: set[str]) -> tuple[str, torch.dtype, tuple[int, ...]]:
    """A tensor header, checked: (name, dtype, shape)."""
    if not isinstance(head, dict) or set(head) != {"name", "dtype", "shape"}:
        raise ReadBackError(f"a read-back header must be an object of name, dtype and shape, got {head!r}"[:300])
    name, dtype, shape = head["name"], head["dtype"], head["shape"]
    if not isinstance(name, str) or name.removeprefix(TIED_HEAD) not in layout:
        raise ReadBackError(f"read-back tensor {name!r:.200}: not a tensor of the checkpoint")
    if name in seen:
        raise ReadBackError(f"read-back tensor {name}: sent twice")
    seen.add(name)
    if dtype not in DTYPES:
        raise ReadBackError(f"read-back tensor {name}: dtype must be one of {sorted(DTYPES)}, got {dtype!r:.40}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):  # not bool
        raise ReadBackError(f"read-back tensor {name}: a shape must be a list of sizes, got {shape!r:.200}")
    if math.prod(shape) > math.prod(layout[name.removeprefix(TIED_HEAD)]):
        raise ReadBackError(
            f"read-back tensor {name}: shape {shape} holds more than the checkpoint's "
            f"{list(layout[name.removeprefix(TIED_HEAD)])}"
        )
    return name, DTYPES[dtype], tuple(shape)
