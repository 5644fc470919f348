"""Property-based fuzz of the receiver's parsing: `wire.recv_payload`, what receiver.py runs on
each TCP transfer, in-process over socket pairs (`test_wire.roundtrip`) against a small fake
checkpoint layout; no vLLM.

The property: every input ends in a PayloadError, or parses to records that fit the layout.
Never another exception, and never a hang: the sender always closes its end, so a transfer
still reading at its deadline is a failure too. Inputs: random bytes; valid payloads (made
by the real `send_payload`, raw and compressed) as they are, with bytes flipped, cut short,
extended or given another manifest length; and valid manifests with a field replaced (names,
kinds, shapes, scales, dtype, encoding), a record dropped or repeated.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lorasync.served_model import dtype_name
from lorasync.server.transports.wire import ENCODINGS, MAGIC, PayloadError
from lorasync.sync.base import Record
from tests.helpers import bits, roundtrip, transfer_bytes

# Two LoRA targets (out, in), a vector and a scalar, as a checkpoint holds them.
LAYOUT = {"q": (8, 6), "k": (4, 8), "norm": (6,), "gate": ()}
DTYPES = [torch.float32, torch.bfloat16]
MAX_BYTES = 1 << 16  # over any valid payload of LAYOUT (q and k in full: 320 float32 values)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(raw: bytes, dtype: torch.dtype) -> list[Record] | PayloadError:
    """What the receiver makes of `raw`: the records it accepted (checked against the layout
    here) or its PayloadError. Any other exception propagates and fails the test."""
    try:
        records = roundtrip(raw, LAYOUT, MAX_BYTES, dtype, seconds=5.0)
    except PayloadError as err:
        assert "time limit" not in str(err), f"the parser waited for bytes that never come: {err}"
        return err
    assert_fit(records, dtype)
    return records


def assert_fit(records: list[Record], dtype: torch.dtype) -> None:
    """Records the receiver may go on with: checkpoint names once each, the server's dtype, a
    full tensor of its target's shape or finite-scaled factors b (out, r), a (r, in)."""
    names = [r.name for r in records]
    assert len(set(names)) == len(names) and set(names) <= set(LAYOUT)
    for r in records:
        target = LAYOUT[r.name]
        assert all(t.dtype == dtype for t in r.tensors)
        shapes = [tuple(t.shape) for t in r.tensors]
        if r.scale is None:
            assert shapes == [target]
        else:
            assert isinstance(r.scale, float) and abs(r.scale) <= torch.finfo(dtype).max
            (out, r_b), (r_a, in_) = shapes
            assert (out, in_) == target and 0 < r_b == r_a <= min(target)


@st.composite
def payloads(draw) -> tuple[list[Record], torch.dtype]:
    """Valid records for LAYOUT in a random order, with random bits for values (NaN, inf,
    subnormals: any value is a valid weight on the wire)."""
    dtype = draw(st.sampled_from(DTYPES))
    names = draw(st.lists(st.sampled_from(sorted(LAYOUT)), unique=True, max_size=len(LAYOUT)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    def tensor(shape):
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).view(shape)

    records = []
    for name in names:
        target = LAYOUT[name]
        if len(target) == 2 and draw(st.booleans()):
            rank = draw(st.integers(1, min(target)))
            scale = draw(st.sampled_from([-0.0, 0.0, 1.0]) | st.floats(-1e4, 1e4))
            records.append(Record(name, (tensor((target[0], rank)), tensor((rank, target[1]))), scale))
        else:
            records.append(Record(name, (tensor(target),)))
    return records, dtype


def split(raw: bytes) -> tuple[dict, bytes]:
    """A valid payload's manifest and the tensor bytes after it."""
    (length,) = struct.unpack("<Q", raw[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    return json.loads(raw[start : start + length]), raw[start + length :]


def fitted(head: dict, body: bytes, dtype: torch.dtype) -> bytes:
    """`body` cut or zero-padded to the raw tensor bytes `head` declares, so that the parser
    gets past the sizes to what it checks next; `body` unchanged when the shapes are not lists
    of lists of small positive ints."""
    try:
        shapes = [s for r in head["records"] for s in r["shapes"]]
        if all(type(d) is int and 0 < d <= 64 for s in shapes for d in s):
            n = sum(math.prod(s) for s in shapes) * torch.empty((), dtype=dtype).element_size()
            return (body + bytes(n))[:n]
    except (TypeError, KeyError):  # not a list of records with shape lists
        pass
    return body


class Raw:
    """JSON text put into a manifest as it is: what `json.dumps` will not write (an int of
    5000 digits, 1e999, nesting 10000 deep)."""

    def __init__(self, text: str) -> None:
        self.text = text


def join(head: dict, body: bytes) -> bytes:
    """A payload of manifest `head` (its `Raw` values written verbatim) and tensor bytes `body`."""
    raws: list[str] = []

    def mark(value):
        raws.append(value.text)
        return f"@raw{len(raws) - 1}@"

    text = json.dumps(head, default=mark)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"', raw)
    return MAGIC + struct.pack("<Q", len(text.encode())) + text.encode() + body


# JSON values nobody should send: any JSON at all, and the edges of each field's checks.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
raw_json = st.builds(
    Raw,
    st.integers(1, 6000).map(lambda n: "7" * n)  # over Python's 4300-digit int limit too
    | st.sampled_from(["1e999", "-1e999", "NaN", "-Infinity", "-0", "1" + "0" * 400])
    | st.integers(1, 20000).map(lambda n: "[" * n + "]" * n),
)
dims = st.sampled_from([0, 1, 2, 3, 4, 6, 8, 9, -1, True, 2**63, 10**30]) | st.integers(-3, 10)
edge_values = {
    "name": st.sampled_from(sorted(LAYOUT)) | st.text(max_size=6),
    "kind": st.sampled_from(["lora", "full", "LORA", "", None]),
    "scale": st.sampled_from([-0.0, 1e308, -1e308, 3.5e38, 1e39, float("nan"), float("inf"), 10**400, "1", None, True])
    | st.floats(),
    "shapes": st.lists(st.lists(dims, max_size=3), max_size=3),
}
head_values = {
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8", "torch.float32", None]),
    "encoding": st.sampled_from([*ENCODINGS, "zlib", None, ["raw"]]),
    "records": st.just([]) | json_values,
}


@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: MAGIC + b))
@FUZZ
def test_random_bytes_are_refused(raw):
    assert isinstance(outcome(raw, torch.float32), PayloadError)


@given(payloads(), st.booleans())
@FUZZ
def test_valid_payloads_arrive_bit_for_bit(payload, compress):
    records, dtype = payload
    got = outcome(transfer_bytes(records, compress), dtype)
    assert [(r.name, r.scale) for r in got] == [(r.name, r.scale) for r in records]
    for sent, received in zip(records, got):
        assert all(torch.equal(bits(x), bits(y)) for x, y in zip(sent.tensors, received.tensors))


@given(payloads(), st.booleans(), st.data())
@FUZZ
def test_payloads_cut_short_extended_or_relengthed_are_refused(payload, compress, data):
    """Cut, extended, another manifest length, or (compressed) another length of the first
    tensor's top byte plane."""
    records, dtype = payload
    raw = transfer_bytes(records, compress)
    cut = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut at")]
    extended = raw + data.draw(st.binary(min_size=1, max_size=64), label="extra")
    bad = [cut, extended, relength(raw, len(MAGIC), data)]
    if compress and records:
        bad.append(relength(raw, len(raw) - len(split(raw)[1]), data))
    for each in bad:
        assert isinstance(outcome(each, dtype), PayloadError)


def relength(raw: bytes, at: int, data) -> bytes:
    """`raw` with the u64 length at `at` replaced by another."""
    (length,) = struct.unpack("<Q", raw[at : at + 8])
    other = data.draw(st.integers(0, 2**64 - 1).filter(lambda n: n != length), label="length")
    return raw[:at] + struct.pack("<Q", other) + raw[at + 8 :]


@given(payloads(), st.booleans(), st.data())
@FUZZ
def test_payloads_with_flipped_bytes_are_refused_or_fit(payload, compress, data):
    records, dtype = payload
    raw = bytearray(transfer_bytes(records, compress))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= data.draw(st.integers(1, 255), label="mask")
    outcome(bytes(raw), dtype)


@given(payloads(), st.data())
@FUZZ
def test_manifests_with_a_field_replaced_are_refused_or_fit(payload, data):
    records, dtype = payload
    assume(records)
    compress = data.draw(st.booleans(), label="compress")
    head, body = split(transfer_bytes(records, compress))
    rec = head["records"][data.draw(st.integers(0, len(records) - 1), label="record")]
    field = data.draw(st.sampled_from([*sorted(edge_values), "rank"]), label="field")
    if field == "rank":  # both factors' r at once: sizes stay consistent, the checks decide
        assume(rec["kind"] == "lora")
        (out, _), (_, in_) = rec["shapes"]
        rank = data.draw(dims, label="rank")
        rec["shapes"] = [[out, rank], [rank, in_]]
    else:
        rec[field] = data.draw(edge_values[field] | json_values | raw_json, label="value")
    outcome(join(head, body if compress else fitted(head, body, dtype)), dtype)


@given(payloads(), st.data())
@FUZZ
def test_manifests_otherwise_changed_are_refused_or_fit(payload, data):
    records, dtype = payload
    compress = data.draw(st.booleans(), label="compress")
    head, body = split(transfer_bytes(records, compress))
    change = data.draw(st.sampled_from(["head field", "drop key", "drop record", "repeat record"]))
    if change == "head field":
        field = data.draw(st.sampled_from(sorted(head_values)), label="field")
        head[field] = data.draw(head_values[field] | json_values | raw_json, label="value")
    elif change == "drop key":
        where = data.draw(st.sampled_from([head, *head["records"]]), label="from")
        where.pop(data.draw(st.sampled_from(sorted(where)), label="key"))
    elif head["records"]:
        i = data.draw(st.integers(0, len(head["records"]) - 1), label="record")
        rec = head["records"].pop(i)
        if change == "repeat record":
            head["records"][i:i] = [rec, rec]
    outcome(join(head, body if compress else fitted(head, body, dtype)), dtype)


@given(st.sampled_from(DTYPES), edge_values["scale"] | json_values | raw_json)
@example(torch.float32, 10**400)  # past every float: OverflowError in math.isfinite
@example(torch.float32, 1e39)  # finite, but inf in float32: the merge would be inf
@example(torch.bfloat16, Raw("7" * 4301))  # over Python's int digits: ValueError in json
@FUZZ
def test_lora_scales_are_refused_or_fit(dtype, scale):
    head = {"dtype": dtype_name(dtype), "encoding": "raw",
            "records": [{"name": "q", "kind": "lora", "scale": scale, "shapes": [[8, 2], [2, 6]]}]}
    outcome(join(head, bytes(28 * torch.empty((), dtype=dtype).element_size())), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_negative_zero_scale_is_a_valid_scale(dtype):
    records = [Record("q", (torch.ones(8, 2, dtype=dtype), torch.ones(2, 6, dtype=dtype)), -0.0)]
    got = outcome(transfer_bytes(records), dtype)
    assert math.copysign(1.0, got[0].scale) == -1.0
