"""The TCP transport, both halves: the server opens a stream back to the client for each
transfer. The client's half is `TcpTransport`; the receiver's (`Endpoint`, `send_info`,
`receive_payload`, `send_model`) is called by `serve/receiver.py` inside vLLM's worker.

The client names a one-shot listener (host, port, nonce) in the request; the server connects,
proves the nonce, and the bytes flow on that stream (`wire.py`). The handshake at connection
(`/init_weight_transfer_engine`: the server's layout, groups, dtype, vocab) goes this way on
every transport; payloads go this way unless the engine uses NCCL; and so does a read-back
(the same route in `read_back` mode: the server streams what its model holds, `readback.py`).
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from lorasync.server.client.control import Control, Pending, ServerInfo, ServerSyncError
from lorasync.server.transports.readback import READ_BACK, ReadBackError, recv_tensors, send_tensors
from lorasync.server.transports.wire import (
    MAGIC,
    MAX_INFO_BYTES,
    NONCE_BYTES,
    Deadline,
    PayloadError,
    recv_exact,
    recv_payload,
    send_payload,
)
from lorasync.sync.base import Record

T = TypeVar("T")
_SLICE = 1 << 20  # bytes a Fanout writes to one stream before the next


class TcpTransport:
    """Transfers over a stream each server opens back to `callback_host` (this process).

    `compress` sends each tensor's top byte plane Huffman-coded (lossless; see `wire.py`).
    """

    def __init__(self, control: Control, callback_host: str, compress: bool) -> None:
        self.control = control
        self.callback_host = callback_host
        self.compress = compress

    def handshake(self, url: str) -> ServerInfo:
        """What the server at `url` serves: checkpoint layout, fused groups, dtype, vocab."""

        info = self.with_callback(
            url, "/init_weight_transfer_engine", "init_info",
            lambda sock, deadline: read_info(sock, url, deadline),
        )
        models = self.control.json(url, "GET", "/v1/models")
        try:
            model = models["data"][0]["id"]
            assert isinstance(model, str)
        except (KeyError, IndexError, TypeError, AssertionError):
            raise ServerSyncError(f"{url}/v1/models: no model id in {models!r}"[:300]) from None
        return ServerInfo.from_report(url, info, model, models["data"][0].get("max_model_len"))

    def send(self, servers: Sequence[ServerInfo], records: Iterable[Record], declared: Sequence[Record]) -> int:
        """Transfer `records` (as `declared`) to servers with open update sessions, all at
        once: each record is read and encoded once and written to every server's stream
        (`Fanout`), so the client holds one record at a time however many servers take it.
        Return the bytes on each server's wire."""
        return self.with_callback(
            [s.url for s in servers], "/update_weights", "update_info",
            lambda sock, deadline: send_payload(sock, records, self.compress, declared),
        )

    def read_back(
        self, server: ServerInfo, visit: Callable[[str, torch.Tensor], None], only: Collection[str] | None = None
    ) -> int:
        """Call `visit(name, tensor)` for each tensor the server's model holds (with `only`,
        of the modules holding those names), as it arrives (`readback.py`); return the bytes
        read. A read-back that breaks its format raises ServerSyncError naming the server."""

        def talk(sock: socket.socket, deadline: Deadline) -> int:
            try:
                return recv_tensors(sock, server.layout, visit, deadline)
            except ReadBackError as err:
                raise ServerSyncError(f"{server.url}: refused its read-back: {err}") from None

        return self.with_callback(server.url, "/init_weight_transfer_engine", "init_info", talk,
                                  mode=READ_BACK, only=None if only is None else sorted(only))

    def close(self) -> None:
        pass  # one connection per transfer: nothing stays open

    def with_callback(
        self, urls: str | Sequence[str], path: str, field: str, talk: Callable[[socket.socket, Deadline], T],
        **fields: object,
    ) -> T:
        """POST `path` to each server in `urls`, naming a one-shot listener each (and
        `fields` besides); run `talk(sock, deadline)` once on their connections: the
        one socket, or for several a `Fanout` writing to all. Reads share one deadline (the
        control timeout).

        The requests block until their server is done with its stream, so they run on threads
        while this one serves the connections. Each server must open its own and prove its
        nonce. A failure names the server it happened on (its own refusal, if it answered
        one); then every stream is reset (`_abandon`), so no server takes the transfer.
        """
        urls = [urls] if isinstance(urls, str) else list(urls)
        timeout = self.control.timeout
        calls: list[tuple[str, bytes, socket.socket, Pending]] = []
        socks: list[socket.socket] = []
        at: int | None = None  # the server a failure is about (None: none yet, a local one)
        try:
            for url in urls:  # every request first: the servers connect back concurrently
                nonce = secrets.token_bytes(NONCE_BYTES)
                listener = socket.create_server((self.callback_host, 0))
                listener.settimeout(0.2)
                port = listener.getsockname()[1]
                endpoint = fields | {"host": self.callback_host, "port": port, "nonce": nonce.hex()}
                calls.append((url, nonce, listener, self.control.start(url, path, json={field: endpoint})))
            for at, (url, nonce, listener, request) in enumerate(calls):
                with listener:
                    sock = _accept(listener, request, timeout)
                if sock is None:
                    request.wait()  # raises the server's refusal, if that is what happened
                    raise ServerSyncError(
                        f"{url}{path}: the server did not connect back to "
                        f"{self.callback_host} within {timeout:.0f} s"
                    )
                socks.append(sock)
                sock.settimeout(timeout)
                deadline = Deadline(timeout, "raise ServerEngine(timeout=...) on the trainer")
                hello = recv_exact(sock, len(MAGIC) + NONCE_BYTES, "hello", deadline)
                if not secrets.compare_digest(bytes(hello), MAGIC + nonce):
                    raise ServerSyncError(f"{url}: a connection without the transfer's nonce")
            deadline = Deadline(timeout, "raise ServerEngine(timeout=...) on the trainer")
            at = 0 if len(socks) == 1 else None  # a Fanout names the stream that broke
            try:
                result = talk(socks[0] if len(socks) == 1 else Fanout(socks), deadline)
            except BrokenStream as broken:
                at = broken.index
                raise broken.error from None
            for at, sock in enumerate(socks):
                sock.shutdown(socket.SHUT_WR)
        except (OSError, PayloadError) as err:  # PayloadError: the stream ended early
            # The server may have refused the payload and closed the stream: wait for its
            # answer (bounded), which says why, and so that nothing else overlaps the request.
            if at is None:  # not one server's: no listener to be had here, say
                _abandon(socks, calls)
                raise
            url, request = calls[at][0], calls[at][3]
            _abandon(socks, calls, but=at)
            try:
                request.wait()
            except ServerSyncError as refused:
                raise refused from None
            raise ServerSyncError(
                f"{url}{path}: transfer broke ({type(err).__name__}: {err}); the server keeps "
                "its previous weights. Is it still running? Restart it and sync again"
            ) from None
        except BaseException:
            _abandon(socks, calls)
            raise
        finally:
            for sock in socks:
                sock.close()
            for _, _, listener, _ in calls:
                listener.close()
        errors = []
        for _, _, _, request in calls:
            try:
                request.wait(extra=5)
            except ServerSyncError as err:
                errors.append(err)
        if errors:
            raise errors[0]
        return result


class BrokenStream(Exception):
    """A write to the `index`th stream of a `Fanout` failed with `error`."""

    def __init__(self, index: int, error: OSError) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


class Fanout:
    """The streams to several servers, written as one: each write goes to every stream in
    turn, so a transfer is read, encoded (and, for a merged sync, computed) once however many
    servers take it. A failed write raises `BrokenStream`, naming the stream."""

    def __init__(self, socks: Sequence[socket.socket]) -> None:
        self.socks = list(socks)

    def sendall(self, data) -> None:
        data = memoryview(data).cast("B")
        # in slices: each server reads one while the next slice goes to the others
        for start in range(0, len(data), _SLICE):
            for index, sock in enumerate(self.socks):
                try:
                    sock.sendall(data[start : start + _SLICE])
                except OSError as err:
                    raise BrokenStream(index, err) from None


def _abandon(socks: Sequence[socket.socket], calls: Sequence[tuple], but: int | None = None) -> None:
    """Reset every stream (each server refuses a transfer broken off, even one whose declared
    bytes had all gone, which a plain close would end as complete) and wait, bounded, for the
    requests' answers, except the one at `but`, whose answer the caller reads: so that no
    request of this transfer overlaps what comes next."""
    for sock in socks:
        try:  # linger 0: close sends a reset, not the end of the stream
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed
        sock.close()
    for index, (_, _, _, request) in enumerate(calls):
        if index != but:
            try:
                request.wait()
            except ServerSyncError:
                pass  # the refusal of a transfer cut short: the failure that matters is raised


def read_info(sock: socket.socket, url: str, deadline: Deadline) -> dict:
    """The server's answer to the handshake (a length, then JSON), its size capped before a
    byte of it is read: a server cannot make the client allocate what it likes."""
    (length,) = struct.unpack("<Q", recv_exact(sock, 8, "server info length", deadline))
    if length > MAX_INFO_BYTES:
        raise ServerSyncError(
            f"{url}: the server declares {length} bytes of server info, over the client's limit "
            f"of {MAX_INFO_BYTES} (wire.MAX_INFO_BYTES); is it a lorasync server of this version?"
        )
    try:
        info = json.loads(bytes(recv_exact(sock, length, "server info", deadline)))
    except (ValueError, RecursionError) as err:  # bad JSON, UTF-8, int digits; deep nesting
        raise ServerSyncError(f"{url}: server info is not valid JSON ({type(err).__name__}: {err})"[:300]) from None
    if not isinstance(info, dict):
        raise ServerSyncError(f"{url}: server info must be a JSON object, got {type(info).__name__}")
    return info


def _accept(listener: socket.socket, request: Pending, timeout: float) -> socket.socket | None:
    """The server's connection, or None if the request ended first or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return listener.accept()[0]
        except TimeoutError:
            if not request.running():  # refused (401, 4xx, 5xx) without connecting
                return None
    return None


# --- the receiver's half: inside vLLM's worker (`serve/receiver.py`) -----------------------------


@dataclass
class Endpoint:
    """Where the client waits for the receiver's connection, and the nonce that proves it."""

    host: str = ""
    port: int = 0
    nonce: str = ""  # hex

    def connect(self, timeout: float) -> socket.socket:
        if len(bytes.fromhex(self.nonce)) != NONCE_BYTES:
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes in hex")
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.sendall(MAGIC + bytes.fromhex(self.nonce))
        return sock


def send_info(endpoint: Endpoint, info: dict, timeout: float) -> None:
    """The handshake's answer: `info` as a length and JSON, what `read_info` reads."""
    body = json.dumps(info).encode()
    with endpoint.connect(timeout) as sock:
        sock.sendall(struct.pack("<Q", len(body)) + body)


def receive_payload(
    endpoint: Endpoint, layout: Mapping[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int,
    deadline: Deadline,
) -> list[Record]:
    """The records of one transfer, every size checked against `layout` before it is read
    (`wire.recv_payload`), all under one `deadline`."""
    with endpoint.connect(deadline.left("the connection")) as sock:
        return recv_payload(sock, layout, dtype, max_bytes, deadline)


def send_model(endpoint: Endpoint, tensors: Iterable[tuple[str, torch.Tensor]], deadline: Deadline) -> int:
    """A read-back: `tensors` streamed one at a time (`readback.send_tensors`); the bytes sent."""
    with endpoint.connect(deadline.left("the connection")) as sock:
        return send_tensors(sock, tensors, deadline)
