"""The TCP transport: the server opens a stream back to the client for each transfer.

The client names a one-shot listener (host, port, nonce) in the request; the server connects,
proves the nonce, and the bytes flow on that stream (`wire.py`). The handshake at connection
(`/init_weight_transfer_engine`: the server's layout, groups, dtype, vocab) goes this way on
every transport; payloads go this way unless the engine uses NCCL.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from lorasync.server.control import Control, Pending, ServerInfo, ServerSyncError
from lorasync.server.wire import (
    MAGIC,
    MAX_INFO_BYTES,
    NONCE_BYTES,
    Deadline,
    PayloadError,
    recv_exact,
    send_payload,
)
from lorasync.sync.base import Record

T = TypeVar("T")


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
        return ServerInfo.from_report(url, info, model)

    def send(self, server: ServerInfo, records: list[Record]) -> int:
        """Transfer `records` to a server with an open update session; return wire bytes."""
        return self.with_callback(
            server.url, "/update_weights", "update_info",
            lambda sock, deadline: send_payload(sock, records, self.compress),
        )

    def close(self) -> None:
        pass  # one connection per transfer: nothing stays open

    def with_callback(
        self, url: str, path: str, field: str, talk: Callable[[socket.socket, Deadline], T]
    ) -> T:
        """POST `path` naming a one-shot listener; run `talk(sock, deadline)` on the server's
        connection, whose reads share one deadline (the control timeout).

        The request blocks until the server is done with the stream, so it runs on a thread
        while this one serves the connection. The server must open it and prove the nonce.
        """
        timeout = self.control.timeout
        nonce = secrets.token_bytes(NONCE_BYTES)
        listener = socket.create_server((self.callback_host, 0))
        listener.settimeout(0.2)
        endpoint = {"host": self.callback_host, "port": listener.getsockname()[1], "nonce": nonce.hex()}
        request = self.control.start(url, path, json={field: endpoint})
        try:
            with listener:
                sock = _accept(listener, request, timeout)
            if sock is None:
                request.wait()  # raises the server's refusal, if that is what happened
                raise ServerSyncError(
                    f"{url}{path}: the server did not connect back to "
                    f"{self.callback_host} within {timeout:.0f} s"
                )
            with sock:
                sock.settimeout(timeout)
                deadline = Deadline(timeout, "raise ServerEngine(timeout=...) on the trainer")
                hello = recv_exact(sock, len(MAGIC) + NONCE_BYTES, "hello", deadline)
                if not secrets.compare_digest(bytes(hello), MAGIC + nonce):
                    raise ServerSyncError(f"{url}: a connection without the transfer's nonce")
                result = talk(sock, deadline)
                sock.shutdown(socket.SHUT_WR)
        except (OSError, PayloadError) as err:  # PayloadError: the stream ended early
            # The server may have refused the payload and closed the stream: wait for its
            # answer (bounded), which says why, and so that nothing else overlaps the request.
            try:
                request.wait()
            except ServerSyncError as refused:
                raise refused from None
            raise ServerSyncError(
                f"{url}{path}: transfer broke ({type(err).__name__}: {err}); the server keeps "
                "its previous weights. Is it still running? Restart it and sync again"
            ) from None
        request.wait(extra=5)
        return result


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
