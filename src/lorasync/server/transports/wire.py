"""The wire format of a server sync: LoRA factors (or whole tensors) over one TCP stream.

Used by both halves of `tcp.py`: the client's `TcpTransport` and the receiver's
`receive_payload` (called by `serve/receiver.py`, inside vLLM), so it imports neither side. One transfer is one connection, opened by the receiver to the
address the client named in the `/update_weights` request:

    receiver -> client:  MAGIC, 32-byte nonce (from the request, proves which request it serves)
    client -> receiver:  MAGIC, u64 manifest length, manifest (JSON), tensor bytes, end of stream

The manifest lists records in order. A `lora` record carries `b` then `a` with
`delta = scale * b @ a` in the checkpoint tensor's orientation (the client transposes for
GPT-2's Conv1D); a `full` record carries the tensor itself (modules_to_save, and variants the
receiver cannot merge from factors). Every size is declared before any byte is read and checked
against the receiver's checkpoint, so a malformed, truncated or oversized payload is refused
before the model is touched. The receiver's reading of one transfer obeys one deadline
(`Deadline`), not a timeout per read: a peer that trickles bytes cannot hold it longer.

Lossless compression (`encoding: "zlib-top-byte"`): each tensor's most significant byte
plane (sign and high exponent bits, a few distinct values for trained weights) is sent
Huffman-coded (zlib), the other planes raw; on bf16 LoRA factors that is ~67% of the raw bytes.
Both ends are assumed little-endian (x86, ARM).
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence

import torch

from lorasync.served_model import dtype_name
from lorasync.sync.base import Record

MAGIC = b"LSYNC1\n"
NONCE_BYTES = 32
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is ~100 bytes a tensor; 16 MiB is ~150k tensors
# What the client reads from a server at connection (layout and groups: ~200 bytes a tensor).
MAX_INFO_BYTES = 64 << 20
_CHUNK = 4 << 20
ENCODINGS = ("raw", "zlib-top-byte")


class PayloadError(ValueError):
    """A transfer broke the wire format; nothing was loaded."""


class Deadline:
    """One time limit for a whole transfer: each read may take only what is left of it.

    `fix` says how to raise the limit (the setting, on which side). `received` counts the
    bytes read under it, for the message when it expires.
    """

    def __init__(self, seconds: float, fix: str) -> None:
        self.seconds, self.fix = seconds, fix
        self.end = time.monotonic() + seconds
        self.received = 0

    def left(self, what: str) -> float:
        """Seconds left, > 0; PayloadError when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.expired(what)
        return left

    def expired(self, what: str) -> PayloadError:
        return PayloadError(
            f"transfer over its time limit of {self.seconds:g} s for the whole payload: "
            f"{self.received} bytes arrived and it was still reading {what}; a slow link or a "
            f"large payload needs more: {self.fix}"
        )


def manifest(records: list[Record], encoding: str = "raw") -> dict:
    """The JSON manifest describing `records` (names, kinds, scales, shapes, one dtype)."""
    dtypes = {t.dtype for r in records for t in r.tensors}
    if len(dtypes) > 1:
        raise ValueError(f"all tensors of one transfer must share a dtype, got {sorted(map(str, dtypes))}")
    return {
        "dtype": dtype_name(dtypes.pop()) if dtypes else "float32",
        "encoding": encoding,
        "records": [
            {
                "name": r.name,
                "kind": r.kind,
                "scale": r.scale,
                "shapes": [list(t.shape) for t in r.tensors],
            }
            for r in records
        ],
    }


def send_payload(
    sock: socket.socket, records: Iterable[Record], compress: bool = False,
    declared: Sequence[Record] | None = None,
) -> int:
    """Write one transfer to `sock`; return the bytes written.

    The manifest declares `declared`, by default `records` themselves: of those only names,
    kinds, scales, shapes and dtype are read, so their tensors may be on the meta device.
    `records` are then read once, in that order, and each is written as it comes: a stream
    computed as it is read (a merged sync; under FSDP2, gathered tensor by tensor) is never
    held whole. A record that differs from its declaration is a ValueError, raised before
    any of its bytes go (the receiver, short of them, refuses the transfer).
    """
    if declared is None:
        declared = records = list(records)
    head = json.dumps(manifest(list(declared), ENCODINGS[compress])).encode()
    sock.sendall(MAGIC + struct.pack("<Q", len(head)) + head)
    sent = len(MAGIC) + 8 + len(head)
    count = 0
    for record in records:
        want = declared[count] if count < len(declared) else None
        if want is None or _declaration(record) != _declaration(want):
            raise ValueError(
                f"record {count} of the transfer is {_declaration(record)}, but the manifest "
                f"declared {_declaration(want) if want else 'no more records'}: a stream must "
                "send what it named, in order"
            )
        count += 1
        for tensor in record.tensors:
            # flat first: a 0-d tensor cannot be viewed as bytes
            planes = tensor.detach().contiguous().reshape(-1).view(torch.uint8).reshape(tensor.numel(), -1)
            if compress:
                top = _deflate(planes[:, -1].contiguous().numpy())
                sock.sendall(struct.pack("<Q", len(top)) + top)
                sent += 8 + len(top)
                planes = planes[:, :-1]
            data = planes.contiguous().reshape(-1).numpy()
            sock.sendall(memoryview(data))
            sent += data.nbytes
    if count != len(declared):
        raise ValueError(f"the transfer declared {len(declared)} records but its stream ended after {count}")
    return sent


def _declaration(record: Record) -> tuple:
    """What a manifest says of a record."""
    return (record.name, record.kind, record.scale, [tuple(t.shape) for t in record.tensors],
            sorted({str(t.dtype) for t in record.tensors}))


def _deflate(plane) -> bytes:
    """Huffman coding alone: the top byte plane is a few distinct values with no long repeats,
    so LZ77 matching finds little. Measured on bf16 factors: 34% of the plane's bytes in 0.12 s
    per 8.8 MB, against 44% in 0.18 s for zlib level 1 with matching."""
    deflater = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_HUFFMAN_ONLY)
    return deflater.compress(plane) + deflater.flush()


def _recv_tensor(
    sock: socket.socket, shape: tuple[int, ...], dtype: torch.dtype, encoding: str, what: str,
    deadline: Deadline,
) -> torch.Tensor:
    """One tensor of a checked manifest, decoded; a corrupt compressed plane is refused."""
    n, elem = _numel(shape), _elem(dtype)
    if encoding == "raw":
        return torch.frombuffer(recv_exact(sock, n * elem, what, deadline), dtype=dtype).view(shape)
    (length,) = struct.unpack("<Q", recv_exact(sock, 8, f"{what} plane length", deadline))
    if length > n + n // 1000 + 64:  # over zlib's worst case for n bytes: not a valid plane
        raise PayloadError(f"{what}: compressed plane of {length} bytes for {n} values")
    inflater = zlib.decompressobj()
    try:
        top = inflater.decompress(recv_exact(sock, length, f"{what} plane", deadline), n)
    except zlib.error as err:
        raise PayloadError(f"{what}: corrupt compressed plane ({err})") from None
    if len(top) != n or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise PayloadError(f"{what}: compressed plane does not hold exactly {n} bytes")
    planes = torch.empty((n, elem), dtype=torch.uint8)
    planes[:, -1] = torch.frombuffer(bytearray(top), dtype=torch.uint8)
    if elem > 1:
        rest = recv_exact(sock, n * (elem - 1), what, deadline)
        planes[:, :-1] = torch.frombuffer(rest, dtype=torch.uint8).view(n, elem - 1)
    return planes.view(-1).view(dtype).view(shape)


def recv_exact(sock: socket.socket, n: int, what: str, deadline: Deadline | None = None) -> bytearray:
    """Read exactly `n` bytes or raise PayloadError (the peer closed early: truncated; or the
    `deadline` passed). Without a deadline the socket's own timeout bounds each read."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = _recv(sock, lambda: sock.recv_into(view[got:], min(n - got, _CHUNK)), what, deadline)
        if k == 0:
            raise PayloadError(f"truncated payload: {what} ended after {got} of {n} bytes")
        got += k
    return buf


def at_end(sock: socket.socket, what: str, deadline: Deadline) -> bool:
    """Whether the peer ends the stream here (within `deadline`), rather than sending more."""
    return not _recv(sock, lambda: sock.recv(1), what, deadline)


def _recv(sock: socket.socket, read, what: str, deadline: Deadline | None) -> int:
    """`read()` (one recv on `sock`, returning a byte count or bytes) within what is left of
    `deadline`; its running out is a PayloadError."""
    if deadline is None:
        return read()
    sock.settimeout(deadline.left(what))
    try:
        got = read()
    except TimeoutError:  # socket.timeout
        raise deadline.expired(what) from None
    deadline.received += got if isinstance(got, int) else len(got)
    return got


def _shape(value, what: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and all(type(d) is int and d > 0 for d in value)):  # not bool
        raise PayloadError(f"{what}: a shape must be a list of positive ints, got {value!r}")
    return tuple(value)


def check_manifest(
    head: Mapping, layout: Mapping[str, tuple[int, ...]], dtype: torch.dtype
) -> list[tuple[str, float | None, list[tuple[int, ...]]]]:
    """Validate a manifest against the receiver's checkpoint layout and dtype.

    Returns (name, scale or None, shapes) per record. A `lora` record must target a 2-D
    checkpoint tensor (out, in) with b (out, r) and a (r, in), 0 < r <= min(out, in); a `full`
    record must have the checkpoint tensor's shape; names are unique.
    """
    if not isinstance(head, Mapping) or not isinstance(head.get("records"), list):
        raise PayloadError("manifest must be a JSON object with a 'records' list")
    if head["records"] and head.get("dtype") != dtype_name(dtype):  # an empty one says float32
        raise PayloadError(
            f"payload dtype {head.get('dtype')!r} is not the server's dtype {dtype_name(dtype)!r}; "
            "send tensors in the engine's dtype"
        )
    out, seen = [], set()
    for i, rec in enumerate(head["records"]):
        what = f"record {i}"
        if not isinstance(rec, Mapping) or not isinstance(rec.get("name"), str):
            raise PayloadError(f"{what}: needs a string 'name'")
        name = rec["name"]
        what = f"record {i} ({name})"
        if name not in layout:
            raise PayloadError(f"{what}: not a tensor of the server's checkpoint")
        if name in seen:
            raise PayloadError(f"{what}: sent twice")
        seen.add(name)
        shapes = rec.get("shapes")
        if not isinstance(shapes, list):
            raise PayloadError(f"{what}: needs a 'shapes' list")
        shapes = [_shape(s, what) for s in shapes]
        target = layout[name]
        if rec.get("kind") == "full":
            if shapes != [target]:
                raise PayloadError(f"{what}: full tensor shapes {shapes}, checkpoint has {list(target)}")
            out.append((name, None, shapes))
        elif rec.get("kind") == "lora":
            scale = rec.get("scale")
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not _fits(scale, dtype):
                raise PayloadError(
                    f"{what}: a lora record needs a finite numeric 'scale' within the server's "
                    f"dtype ({dtype_name(dtype)}: |scale| <= {torch.finfo(dtype).max:g}), got {scale!r:.40}"
                )
            ok = (
                len(target) == 2
                and len(shapes) == 2
                and len(shapes[0]) == 2
                and len(shapes[1]) == 2
                and shapes[0][0] == target[0]
                and shapes[1][1] == target[1]
                and shapes[0][1] == shapes[1][0] <= min(target)
            )
            if not ok:
                raise PayloadError(
                    f"{what}: lora factors b {shapes[0] if shapes else None}, a "
                    f"{shapes[1] if len(shapes) > 1 else None} do not fit checkpoint tensor "
                    f"{list(target)} (need b (out, r), a (r, in), r <= min(out, in))"
                )
            out.append((name, float(scale), shapes))
        else:
            raise PayloadError(f"{what}: kind must be 'lora' or 'full', got {rec.get('kind')!r}")
    return out


def _fits(scale: int | float, dtype: torch.dtype) -> bool:
    """Finite, and finite in `dtype` (a merge with it would fill the weights with inf)."""
    try:
        return abs(float(scale)) <= torch.finfo(dtype).max  # False for NaN
    except OverflowError:  # an int past every float (JSON has no size limit)
        return False


def check_payload(
    head: Mapping, layout: Mapping[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int
) -> list[tuple[str, float | None, list[tuple[int, ...]]]]:
    """`check_manifest`, and the payload's encoding and declared size against `max_bytes`."""
    checked = check_manifest(head, layout, dtype)
    encoding = head.get("encoding", "raw")
    if encoding not in ENCODINGS:
        raise PayloadError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    total = payload_bytes(checked, dtype)
    if total > max_bytes:
        raise PayloadError(
            f"payload declares {total} bytes, over the server's limit of {max_bytes} "
            "(LORASYNC_MAX_PAYLOAD_BYTES on the server)"
        )
    return checked


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return _elem(dtype) * _numel(shape)


def payload_bytes(records: list[tuple[str, float | None, list[tuple[int, ...]]]], dtype: torch.dtype) -> int:
    """Tensor bytes a checked manifest declares."""
    return sum(tensor_bytes(s, dtype) for _, _, shapes in records for s in shapes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def recv_payload(
    sock: socket.socket,
    layout: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    max_bytes: int,
    deadline: Deadline,
) -> list[Record]:
    """Read and validate one transfer; every check runs before the caller touches weights.

    Refuses a bad magic, a manifest over MAX_MANIFEST_BYTES, a payload declaring more than
    `max_bytes`, shapes that do not fit the checkpoint, a stream that ends early (truncated),
    bytes after the declared end (oversized) and a transfer still incomplete at `deadline`.
    """
    if bytes(recv_exact(sock, len(MAGIC), "magic", deadline)) != MAGIC:
        raise PayloadError("not a lorasync payload (bad magic); client and server versions differ?")
    (length,) = struct.unpack("<Q", recv_exact(sock, 8, "manifest length", deadline))
    if length > MAX_MANIFEST_BYTES:
        raise PayloadError(f"manifest of {length} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
    try:
        head = json.loads(bytes(recv_exact(sock, length, "manifest", deadline)))
    # ValueError: not JSON, not UTF-8, or an int over Python's 4300 digits; RecursionError: nesting
    except (ValueError, RecursionError) as err:
        raise PayloadError(f"manifest is not valid JSON: {type(err).__name__}: {err}"[:300]) from None
    checked = check_payload(head, layout, dtype, max_bytes)
    encoding = head.get("encoding", "raw")
    total = payload_bytes(checked, dtype)
    records = []
    for name, scale, shapes in checked:
        tensors = tuple(_recv_tensor(sock, s, dtype, encoding, name, deadline) for s in shapes)
        records.append(Record(name, tensors, scale))
    if not at_end(sock, "the end of the stream", deadline):
        raise PayloadError(f"oversized payload: bytes follow the declared {total} tensor bytes")
    return records


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
