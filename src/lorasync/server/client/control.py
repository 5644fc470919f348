"""The client's HTTP control of a server: one request at a time, every failure made plain.

`Control.call` turns any failure (no answer, a refused token, an error status, an answer over
`MAX_RESPONSE_BYTES`) into a `ServerSyncError` that says what to do; `Control.json` also
parses the answer. `ServerInfo` is what a server reported at connection, checked field by
field (`ServerInfo.from_report`): a server is trusted with nothing it did not prove.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import httpx

from lorasync.served_model import DTYPES

# The largest answer to a control request the client reads: those it makes answer a few
# hundred bytes (a version, a model list, an error); a server cannot make it allocate more.
MAX_RESPONSE_BYTES = 1 << 20

class ServerSyncError(RuntimeError):
    """A server did not take a sync (it still serves its previous weight version), or did not
    answer a request; the message names it."""


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
    max_model_len: int | None = None  # tokens a sequence may hold, as /v1/models says (None: unsaid)

    @classmethod
    def from_report(cls, url: str, info: dict, model: str, max_model_len: object = None) -> ServerInfo:
        """The handshake's JSON object, each field checked for its type before it is used."""

        def field(name: str, rule: str, ok) -> object:
            value = info.get(name)
            if not ok(value):
                raise ServerSyncError(
                    f"{url}: the server's info field {name!r} must be {rule}, got {value!r}"[:300]
                    + "; is it a lorasync server of this version?"
                )
            return value

        def count(v) -> bool:
            return type(v) is int and v > 0

        def shape(v) -> bool:
            return isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)

        def names(v) -> bool:
            return isinstance(v, list) and all(isinstance(n, str) for n in v)

        layout = field("layout", "an object of names to shapes (lists of sizes)",
                       lambda v: isinstance(v, dict) and all(shape(d) for d in v.values()))
        return cls(
            url=url,
            layout={k: tuple(v) for k, v in layout.items()},
            groups=field("groups", "a list of lists of names", lambda v: isinstance(v, list) and all(names(g) for g in v)),
            dtype=field("dtype", f"one of {', '.join(DTYPES)}", lambda v: isinstance(v, str) and v in DTYPES),
            vocab_size=field("vocab_size", "a positive integer", count),
            model=model,
            max_payload_bytes=field("max_payload_bytes", "a positive integer", count),
            workers=field("workers", "a positive integer", count),
            merge_kernel=field("merge_kernel", "a string", lambda v: isinstance(v, str)),
            max_model_len=max_model_len if count(max_model_len) else None,
        )


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
                response = self._request(method, url + path, **kwargs)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                if not retry:
                    raise
                response = self._request(method, url + path, **kwargs)
        except httpx.HTTPError as err:
            raise ServerSyncError(
                f"{url}{path}: {type(err).__name__}: {err or 'no answer'} (within "
                f"{self.timeout:.0f} s). Is the server running? Restart it and sync again: a "
                "restarted server starts from the base weights and takes the next sync"
            ) from None
        if response is None:
            raise ServerSyncError(
                f"{url}{path}: the answer is over the client's limit of {MAX_RESPONSE_BYTES} bytes "
                "(control.MAX_RESPONSE_BYTES); is it a lorasync server of this version?"
            )
        if response.status_code != 200:
            raise ServerSyncError(f"{url}{path} answered {response.status_code}: {response.text[:500]}")
        return response

    def json(self, url: str, method: str, path: str, retry: bool = False, **kwargs) -> object:
        """`call`, and its answer parsed as JSON (ServerSyncError if it is not)."""
        response = self.call(url, method, path, retry, **kwargs)
        try:
            return response.json()
        except (ValueError, RecursionError) as err:
            raise ServerSyncError(f"{url}{path}: the answer is not JSON ({type(err).__name__}: {err})"[:300]) from None

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response | None:
        """The answer read to at most MAX_RESPONSE_BYTES (decoded); None past that."""
        with self._http.stream(method, url, **kwargs) as streamed:
            body = bytearray()
            for chunk in streamed.iter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    return None
        # the body as read (already decoded: the content-encoding header is dropped)
        headers = [(k, v) for k, v in streamed.headers.items() if k.lower() != "content-encoding"]
        return httpx.Response(streamed.status_code, headers=headers, content=bytes(body), request=streamed.request)

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
