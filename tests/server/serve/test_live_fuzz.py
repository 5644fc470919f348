"""A live `lorasync serve` takes 90 mutated transfers through the real protocol and comes out as
it went in: healthy, serving the same logprobs and version, and taking the next good sync.

Each payload is a valid one from `wire.send_payload` (two LoRA records and a full tensor; raw
and compressed), mutated: flipped bytes, wrong lengths, names, shapes, dtypes, scales and
encodings, truncation, junk, a stream that stalls; and a few `/update_weights` requests that
are themselves malformed. Each goes as a trainer sends one, on a paused server:
`/start_weight_update`, then `/update_weights` naming a one-shot listener the server connects
back to (the client's own `TcpTransport.with_callback`), then the received payload, if any, is
discarded and the session closed, as after another server's failure: nothing is ever loaded.
A mutation that breaks the format must be refused with the server's answer; a flip inside the
tensor bytes leaves a well-formed payload (there is no checksum), so the server may take it.
The format itself, in-process: tests/server/transports/test_wire.py.
"""

import json
import math
import random
import struct
import time

import httpx
import pytest
import torch

from lorasync.server.client.engine import ServerEngine
from lorasync.server.client.control import ServerSyncError
from lorasync.server.client import update
from lorasync.server.transports.tcp import TcpTransport
from lorasync.server.transports.wire import MAGIC, MAX_MANIFEST_BYTES
from lorasync.sync.base import Record
from lorasync.sync.verify import probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import TOKEN, Server, max_diff, openai_scores, policy, transfer_bytes

pytestmark = pytest.mark.vllm
TRANSFER_TIMEOUT = 3  # the server's limit for one transfer (LORASYNC_TRANSFER_TIMEOUT)
STALL = TRANSFER_TIMEOUT + 1.5  # how long the stalling client waits: past the server's limit
HEAD = len(MAGIC) + 8  # magic and the manifest's length


@pytest.fixture(scope="module")
def server(tiny_model):
    from lorasync.server.serve.receiver import TIMEOUT_ENV

    with pytest.MonkeyPatch.context() as env:
        env.setenv(TIMEOUT_ENV, str(TRANSFER_TIMEOUT))  # so the stalled stream is cut soon
        started = Server(tiny_model("qwen2")).start()
    try:
        yield started.wait()
    finally:
        started.kill()


# --- the payloads ------------------------------------------------------------------------------


def valid_records(layout: dict, dtype: torch.dtype) -> list[Record]:
    """Two LoRA records (fused q and unfused down_proj) and a full tensor, small random values."""
    gen = torch.Generator().manual_seed(0)
    records = []
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        out, inn = layout[name]
        b, a = (0.01 * torch.randn(shape, generator=gen) for shape in ((out, 4), (4, inn)))
        records.append(Record(name, (b.to(dtype), a.to(dtype)), 2.0))
    norm = 1 + 0.01 * torch.randn(layout["model.norm.weight"], generator=gen)
    return records + [Record("model.norm.weight", (norm.to(dtype),))]


def split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[len(MAGIC) : HEAD])
    return json.loads(raw[HEAD : HEAD + length]), raw[HEAD + length :]


def join(manifest: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A transfer of `manifest` (re-encoded; bytes as they are) and `data`; `length` declared."""
    head = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return MAGIC + struct.pack("<Q", len(head) if length is None else length) + head + data


def flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]


def edited(raw: bytes, edit) -> bytes:
    """`raw` with its manifest changed by `edit(manifest)` (in place), the tensor bytes kept."""
    head, data = split(raw)
    edit(head)
    return join(head, data)


def rec(i: int, **fields):
    """An edit setting fields of record `i` (None: remove the field)."""

    def edit(head: dict) -> None:
        for key, value in fields.items():
            if value is None:
                head["records"][i].pop(key)
            else:
                head["records"][i][key] = value

    return edit


def top(**fields):
    """An edit setting top-level manifest fields (None: remove)."""

    def edit(head: dict) -> None:
        for key, value in fields.items():
            if value is None:
                head.pop(key)
            else:
                head[key] = value

    return edit


def mutations(raw: bytes, packed: bytes) -> list[tuple[str, bytes, bool]]:
    """(id, bytes to send, whether the server must refuse them), from a raw and a compressed
    valid transfer."""
    rng = random.Random(0)
    head, data = split(raw)
    end = len(raw) - len(data)  # where the tensor bytes start
    b_shape, a_shape = head["records"][0]["shapes"]
    refused = [
        ("empty", b""),
        ("magic-flipped", flip(raw, 0)),
        ("magic-only", MAGIC),
        ("other-version-magic", b"LSYNC2\n" + raw[len(MAGIC) :]),
        ("http-request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("junk-64", rng.randbytes(64)),
        ("junk-64k", rng.randbytes(64 << 10)),
        ("magic-then-junk", MAGIC + rng.randbytes(4096)),
        *((f"truncated-at-{at}", raw[:at]) for at in (3, HEAD - 3, HEAD + 5, end, end + 1, end + len(data) // 2, len(raw) - 1)),
        ("one-byte-over", raw + b"\0"),
        ("4k-over", raw + rng.randbytes(4096)),
        ("twice", raw + raw),
        ("length-0", join(split(raw)[0], data, 0)),
        ("length-short", join(split(raw)[0], data, end - HEAD - 1)),
        ("length-long", join(split(raw)[0], data, end - HEAD + 1)),
        ("length-over-limit", join(split(raw)[0], data, MAX_MANIFEST_BYTES + 1)),
        ("length-2^64-1", join(split(raw)[0], data, 2**64 - 1)),
        ("manifest-not-json", join(b"{records: [", data)),
        ("manifest-list", join(b"[]", data)),
        ("manifest-null", join(b"null", data)),
        ("manifest-deep", join(b"[" * 100_000, data)),
        ("manifest-not-utf8", join(b'{"records": "\xff\xfe"}', data)),
        ("manifest-huge-int", join(b'{"records": [], "dtype": ' + b"9" * 5000 + b"}", data)),
        ("name-unknown", edited(raw, rec(0, name="model.layers.9.self_attn.q_proj.weight"))),
        ("name-empty", edited(raw, rec(0, name=""))),
        ("name-int", edited(raw, rec(0, name=7))),
        ("name-path", edited(raw, rec(0, name="../../etc/passwd"))),
        ("name-100k", edited(raw, rec(0, name="x" * 100_000))),
        ("name-missing", edited(raw, rec(0, name=None))),
        ("record-twice", edited(raw, lambda h: h["records"].insert(1, h["records"][0]))),
        ("records-empty", edited(raw, top(records=[]))),
        ("records-object", edited(raw, top(records={}))),
        ("records-missing", edited(raw, top(records=None))),
        ("record-null", edited(raw, lambda h: h["records"].insert(0, None))),
        ("kind-upper", edited(raw, rec(0, kind="LORA"))),
        ("kind-missing", edited(raw, rec(0, kind=None))),
        ("kind-full-on-factors", edited(raw, rec(0, kind="full"))),
        ("kind-lora-on-full", edited(raw, rec(2, kind="lora", scale=1.0))),
        ("shapes-swapped", edited(raw, rec(0, shapes=[a_shape, b_shape]))),
        ("shapes-one", edited(raw, rec(0, shapes=[b_shape]))),
        ("shapes-three", edited(raw, rec(0, shapes=[b_shape, a_shape, a_shape]))),
        ("rank-over-min", edited(raw, rec(0, shapes=[[b_shape[0], 129], [129, a_shape[1]]]))),
        ("rank-0", edited(raw, rec(0, shapes=[[b_shape[0], 0], [0, a_shape[1]]]))),
        ("dim-negative", edited(raw, rec(0, shapes=[[b_shape[0], -4], [-4, a_shape[1]]]))),
        ("dim-float", edited(raw, rec(0, shapes=[[b_shape[0], 4.0], [4.0, a_shape[1]]]))),
        ("dim-string", edited(raw, rec(0, shapes=[[b_shape[0], "4"], ["4", a_shape[1]]]))),
        ("dims-3d", edited(raw, rec(0, shapes=[[*b_shape, 1], [1, *a_shape]]))),
        ("dims-huge", edited(raw, rec(0, shapes=[[b_shape[0], 2**40], [2**40, a_shape[1]]]))),
        ("shapes-string", edited(raw, rec(0, shapes="128x4"))),
        ("full-wrong-shape", edited(raw, rec(2, shapes=[[64]]))),
        ("full-rank-2", edited(raw, rec(2, shapes=[[1, 128]]))),
        ("dtype-bfloat16", edited(raw, top(dtype="bfloat16"))),
        ("dtype-float64", edited(raw, top(dtype="float64"))),
        ("dtype-int", edited(raw, top(dtype=32))),
        ("dtype-missing", edited(raw, top(dtype=None))),
        ("scale-nan", edited(raw, rec(0, scale=math.nan))),
        ("scale-inf", edited(raw, rec(0, scale=-math.inf))),
        ("scale-string", edited(raw, rec(0, scale="2.0"))),
        ("scale-null", edited(raw, rec(0, scale=None))),
        ("scale-bool", edited(raw, rec(0, scale=True))),
        ("encoding-unknown", edited(raw, top(encoding="gzip"))),
        ("encoding-null", edited(raw, lambda h: h.update(encoding=None))),
        ("raw-bytes-declared-compressed", edited(raw, top(encoding="zlib-top-byte"))),
        ("compressed-bytes-declared-raw", edited(packed, top(encoding="raw"))),
        ("plane-length-huge", _plane_length(packed, lambda n: 2**40)),
        ("plane-length-long", _plane_length(packed, lambda n: n + 1)),
        ("plane-length-short", _plane_length(packed, lambda n: n - 1)),
        ("plane-truncated", packed[: len(packed) - len(split(packed)[1]) + 8 + 3]),
    ]
    # No checksum: a flip in tensor bytes (or a compressed plane's) may well be taken.
    packed_start = len(packed) - len(split(packed)[1])
    either = [
        *((f"data-flip-{i}", flip(raw, rng.randrange(end, len(raw)))) for i in range(5)),
        *((f"plane-flip-{i}", flip(packed, packed_start + 8 + i)) for i in range(3)),
        ("extra-fields", edited(raw, top(comment="hi", records_count=3))),
    ]
    return [(name, payload, True) for name, payload in refused] + [(n, p, False) for n, p in either]


def _plane_length(packed: bytes, change) -> bytes:
    """`packed` with the first compressed plane's declared length changed."""
    head, data = split(packed)
    (n,) = struct.unpack("<Q", data[:8])
    return join(head, struct.pack("<Q", change(n)) + data[8:])


# Malformed `/update_weights` requests: no payload flows, the request itself is wrong.
BAD_REQUESTS = {
    "nonce-not-hex": {"host": "127.0.0.1", "port": 9, "nonce": "zz" * 32},
    "nonce-short": {"host": "127.0.0.1", "port": 9, "nonce": "ab"},
    "port-closed": {"host": "127.0.0.1", "port": 1, "nonce": "ab" * 32},
    "unknown-field": {"host": "127.0.0.1", "port": 1, "nonce": "ab" * 32, "evil": 1},
    "nccl-without-group": {"manifest": {"dtype": "float32", "records": []}},
    "a-list": [{"host": "127.0.0.1"}],
}


# --- sending them --------------------------------------------------------------------------------


def send(engine: ServerEngine, tcp: TcpTransport, talk=None, update_info=None) -> str | None:
    """One transfer in its own update session: `talk(sock, ...)` writes to the server's
    connection, or `update_info` is the request's own. The server's refusal, or None if it
    took the payload; whatever it took is discarded and the session closed: nothing loads."""
    url = engine.urls[0]
    # retry: after an error answer the server drops the connection (see Control.call)
    engine.control.call(url, "POST", "/start_weight_update", retry=True)
    try:
        if update_info is not None:
            engine.control.call(url, "POST", "/update_weights", json={"update_info": update_info})
        else:
            tcp.with_callback(url, "/update_weights", "update_info", talk)
        refusal = None
    except ServerSyncError as err:
        refusal = str(err)
    update.discard(engine.control, engine._servers[0])
    return refusal


def stall(payload: bytes):
    """A client that sends half of `payload` and then nothing, past the server's limit."""

    def talk(sock, *_) -> None:  # *_: what else TcpTransport hands its talkers
        sock.sendall(payload[: len(payload) // 2])
        time.sleep(STALL)

    return talk


def test_mutated_transfers_leave_the_server_serving_and_syncing(server, tiny_model):
    engine = ServerEngine(server.url, TOKEN, timeout=15, compress=False)
    tcp = TcpTransport(engine.control, "127.0.0.1", compress=False)
    probes = probe_sequences(engine.vocab_size, n=3, length=16)
    before, version = openai_scores(server.url, probes), engine.served_versions()
    records = valid_records(engine.checkpoint_layout(), engine.dtype)
    raw, packed = transfer_bytes(records), transfer_bytes(records, compress=True)
    cases = mutations(raw, packed)
    assert len(cases) >= 70
    # the unmutated payloads are taken: what the mutations start from is valid
    assert send(engine, tcp, lambda sock, *_: sock.sendall(raw)) is None
    assert send(engine, tcp, lambda sock, *_: sock.sendall(packed)) is None

    start = time.monotonic()
    taken, outcomes = [], {}
    engine.control.call(server.url, "POST", "/pause", params={"mode": "wait", "clear_cache": "true"})
    try:
        for name, payload, must_refuse in cases:
            outcomes[name] = send(engine, tcp, lambda sock, *_, p=payload: sock.sendall(p))
            if outcomes[name] is None and must_refuse:
                taken.append(name)
        outcomes["stalled"] = send(engine, tcp, stall(raw))
        for name, info in BAD_REQUESTS.items():
            outcomes[name] = send(engine, tcp, update_info=info)
            if outcomes[name] is None:
                taken.append(name)
    finally:
        engine.control.call(server.url, "POST", "/resume", retry=True)
    seconds = time.monotonic() - start
    print(f"{len(outcomes)} mutated transfers in {seconds:.1f} s; taken (then discarded): "
          f"{sorted(n for n, o in outcomes.items() if o is None)}")

    assert not taken, f"malformed transfers the server took: {taken}"
    # every refusal is the server's answer (not a hang or a dead server), the stall included
    not_answered = [n for n, o in outcomes.items() if o is not None and "answered" not in o]
    assert not not_answered, {n: outcomes[n] for n in not_answered}
    assert outcomes["stalled"] is not None

    # the server is healthy, generates, and serves what it served before, to the last bit
    assert httpx.get(f"{server.url}/health").status_code == 200
    out = engine.generate([[5, 6, 7]], max_tokens=4, temperature=0.0)
    assert len(out[0][0].token_ids) == 4
    assert engine.served_versions() == version
    assert max_diff(openai_scores(server.url, probes), before) == 0.0

    # and a normal sync still works
    trainer = policy(tiny_model("qwen2"), targets=["all-linear"])
    report = WeightSync(trainer, engine, "factors")()
    assert engine.served_versions() == [str(report.version)]
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    engine.close()
