"""The client's HTTP control of a server: one request at a time, every failure made plain.

`Control.call` turns any failure (no answer, a refused token, an error status) into a
`ServerSyncError` that says what to do. `ServerInfo` is what a server reported at connection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import httpx


class ServerSyncError(RuntimeError):
    """A server did not take a sync; it still serves its previous weight version."""


@dataclass
class ServerInfo:
    """What one server serves, as it reported at connection (`/init_weight_transfer_engine`)."""

    url: str
    layout: dict[str, tuple[int, ...]]
    groups: list[list[str]]
    dtype: str
    vocab_size: int
    model: str
    max_payload_bytes: int
    workers: int  # vLLM workers of the server (tensor x pipeline parallel): NCCL ranks 1..n
    merge_kernel: str  # how it merges factors received over TCP (`sync.merge_kernel.Kernel`)
    group: object = None  # the NCCL communicator with them, for transport="nccl"


class Control:
    """Authenticated HTTP requests to the servers, bounded by `timeout` seconds each."""

    def __init__(self, token: str, timeout: float) -> None:
        self.timeout = timeout
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def call(self, url: str, method: str, path: str, retry: bool = False, **kwargs) -> httpx.Response:
        """One control request; any failure becomes a ServerSyncError that says what to do.

        `retry`: once more on a connection error, for requests safe to repeat (resume, pause).
        After answering a route with an error the server drops the keep-alive connection, and
        the next request on it is reset: without this a failed sync could leave it paused.
        """
        try:
            try:
                response = self._http.request(method, url + path, **kwargs)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                if not retry:
                    raise
                response = self._http.request(method, url + path, **kwargs)
        except httpx.HTTPError as err:
            raise ServerSyncError(
                f"{url}{path}: {type(err).__name__}: {err or 'no answer'} (within "
                f"{self.timeout:.0f} s). Is the server running? Restart it and sync again: a "
                "restarted server starts from the base weights and takes the next sync"
            ) from None
        if response.status_code != 200:
            raise ServerSyncError(f"{url}{path} answered {response.status_code}: {response.text[:500]}")
        return response

    def close(self) -> None:
        self._http.close()

    def start(self, url: str, path: str, **kwargs) -> Pending:
        """POST `path` on a thread: for requests that return only once this process has done
        its part of the transfer they start (the server connects back, or joins a broadcast)."""
        return Pending(self, url, path, kwargs)


class Pending:
    """A POST running on its own thread; `wait` joins it and raises its error, if any."""

    def __init__(self, control: Control, url: str, path: str, kwargs: dict) -> None:
        self.url, self.path = url, path
        self.error: ServerSyncError | None = None
        self.response: httpx.Response | None = None

        def post() -> None:
            try:
                self.response = control.call(url, "POST", path, **kwargs)
            except ServerSyncError as err:
                self.error = err

        self._thread = threading.Thread(target=post, daemon=True)
        self._thread.start()
        self._timeout = control.timeout

    def running(self) -> bool:
        return self._thread.is_alive()

    def failed(self) -> bool:
        return not self.running() and self.error is not None

    def wait(self, extra: float = 0.0) -> httpx.Response:
        """The answer, within the control timeout (+ `extra` s); ServerSyncError otherwise."""
        self._thread.join(self._timeout + extra)
        if self.running():
            raise ServerSyncError(f"{self.url}{self.path}: no answer within {self._timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.response
