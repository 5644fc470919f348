"""`PauseLease`: the ASGI middleware that ends a pause its client left behind (issue #27).

A sync pauses each server (`/pause`) and only its client resumes it (`/resume`): a trainer
that died or stalled in between left the server serving nobody. The lorasync client pauses
with `/pause?...&lease=S` (`update.pause_lease`), and the server then resumes by itself once
S seconds pass with no request of the update reaching it:

- a `/pause` with `lease` arms the lease when it arrives (vLLM stops scheduling new requests
  from then on, even while the pause waits for the requests in flight to finish); a `/pause`
  that fails drops the lease it armed;
- every request of the update (`UPDATE_PATHS`: another `/pause`, `/start_weight_update`,
  `/update_weights`, `/finish_weight_update`, `/reset_prefix_cache`) renews it, and one in
  flight (a pause draining long requests, a long transfer) holds it: the S seconds count from
  the moment the last one answered;
- a `/resume` answered 200 ends it;
- when it runs out, the server does what a failed client's cleanup does (`update.discard`,
  then a reset and `/resume`, `EXPIRY`), by calling the app it wraps directly (no network;
  inside the guard, so no token), logging a warning that names the lease. Until the next
  `/pause` (or `/resume`), the rest of the expired update is refused (409,
  `REFUSED_AFTER_EXPIRY`): a client that was only slow must not load weights into a server
  that is serving again.

A `/pause` without `lease` arms nothing: the server stays paused until someone resumes it, as
vLLM's own route does (other clients of these routes may pause for as long as they like).

`lorasync serve` registers it inside `guard.TokenGuard` (`launch.serve_command`), so only
authorized requests reach it. Runs inside the server; imports nothing of lorasync's trainer
side. All of it runs on the server's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any
from urllib.parse import parse_qs

from lorasync.server.serve.guard import route_path

LEASE_PARAM = "lease"  # /pause?lease=S: seconds
# The requests of an update: each renews an armed lease, and one in flight holds it.
UPDATE_PATHS = frozenset({
    "/pause", "/start_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache",
})
# What an expired lease runs, in order: (path, query, JSON body). Drop a payload received and
# close the update session (`update.discard`; the receiver loads nothing on a bare finish
# after a discard, and with no session open both are refused, which is fine); drop KV blocks a
# half-finished load could have left (with in_flight="keep", frozen requests recompute); resume.
EXPIRY = (
    ("/update_weights", b"", {"update_info": {"discard": True}}),
    ("/finish_weight_update", b"", {}),
    ("/reset_prefix_cache", b"reset_running_requests=true", None),
    ("/resume", b"", None),
)
# Refused after an expiry until the next /pause or /resume: a slow client's update goes no further.
REFUSED_AFTER_EXPIRY = frozenset({"/start_weight_update", "/update_weights", "/finish_weight_update"})

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:
    # vLLM's server leaves the root logger at ERROR: an expiry must reach the operator (stderr)
    log.setLevel(logging.WARNING)


def lease_of(query_string: bytes) -> float | None:
    """The lease a `/pause` asks for, in seconds (None: none); ValueError if it is not a
    positive, finite number."""
    values = parse_qs(query_string.decode("latin-1"), keep_blank_values=True).get(LEASE_PARAM)
    if not values:
        return None
    try:
        seconds = float(values[-1])
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"/pause: {LEASE_PARAM} must be a positive number of seconds, got {values[-1]!r:.40}")
    return seconds


class PauseLease:
    """ASGI middleware: `/pause?lease=S` makes the server resume itself once S seconds pass
    with no request of the update in flight or arriving (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seconds: float | None = None  # the lease armed; None: none
        self._holders: set[int] = set()  # requests of the update running now, holding the lease
        self._seq = 0
        self.expired = False  # a lease ran out: the rest of that update is refused
        self.expiries = 0  # how many leases ran out (for tests and logs)
        self._timer: asyncio.TimerHandle | None = None
        self._expiry: asyncio.Task | None = None
        self._scope: dict | None = None  # the arming request's scope as it came in: a template
        self._taken = 0  # bumped by each /pause: an expiry under way then stops

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # matched as Starlette routes it (root_path removed), as the guard does
        path = route_path(scope) if scope["type"] == "http" else None
        if scope["type"] != "http" or (path not in UPDATE_PATHS and path != "/resume"):
            return await self.app(scope, receive, send)
        if path == "/resume":
            if await self._forward(scope, receive, send) == 200:
                self._end()
            return
        lease = None
        if path == "/pause":
            try:
                lease = lease_of(scope.get("query_string", b""))
            except ValueError as err:
                return await _answer(send, 400, str(err))
            self._taken += 1
            self.expired = False  # a new update begins
        elif self.expired and path in REFUSED_AFTER_EXPIRY:
            return await _answer(send, 409, (
                f"{path}: this server's pause lease ran out before this request came, and the "
                "server dropped what the update had received and resumed; sync again"
            ))
        armed_here = lease is not None and self.seconds is None
        if lease is not None:
            self.seconds = lease
            self._scope = dict(scope)  # before the layers inside add their own keys
        self._seq += 1
        holder = self._seq
        self._holders.add(holder)
        self._stop_timer()
        status = None
        try:
            status = await self._forward(scope, receive, send)
        finally:
            self._holders.discard(holder)
            if armed_here and status != 200:
                self.seconds = None  # that pause did not take: nothing to end
            self._start_timer()

    async def _forward(self, scope: dict, receive: Any, send: Any) -> int | None:
        """Run the request through the app; return the status it answered (None: none)."""
        status = None

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        return status

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_timer(self) -> None:
        if self.seconds is not None and not self._holders and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.seconds, self._run_out)

    @property
    def in_flight(self) -> int:
        """Requests of the update running now that hold the lease."""
        return len(self._holders)

    def _end(self) -> None:
        """The pause ended (a /resume answered 200): no lease, nothing refused, and requests
        of the update still running hold nothing (a /pause the client gave up on may wait for
        an idle engine long after, and must not hold the next sync's lease)."""
        self._holders.clear()
        self._stop_timer()
        self.seconds = None
        self.expired = False

    def _run_out(self) -> None:
        self._timer = None
        self._expiry = asyncio.ensure_future(self.expire())

    async def expire(self) -> None:
        """The lease ran out: drop what the update received, reset, resume (`EXPIRY`),
        through the app this wraps; stop early if a client pauses it meanwhile (a new sync)."""
        seconds, taken = self.seconds, self._taken
        self.seconds, self.expired = None, True
        self.expiries += 1
        log.warning(
            "lorasync: the pause lease of %g s ran out: no request of the update came for that "
            "long (its client died or stalled); dropping what the update received and resuming "
            "this server (the rest of that update will be refused)", seconds,
        )
        results = []
        for path, query, body in EXPIRY:
            if self._taken != taken:
                log.warning("lorasync: a client paused this server while its pause lease was "
                            "ending: left to it")
                return
            results.append(f"{path} {await self._call(path, query, body)}")
        resumed = results[-1].endswith(" 200")
        (log.warning if resumed else log.error)(
            "lorasync: pause lease of %g s ended: %s (%s)", seconds,
            "resumed" if resumed else "RESUMING FAILED, the server is still paused", "; ".join(results),
        )

    async def _call(self, path: str, query: bytes, body: dict | None) -> str:
        """POST `path` to the wrapped app, as if a client had (a scope made from the arming
        request's); return its status, or the error it raised, as text."""
        payload = b"" if body is None else json.dumps(body).encode()
        full = (self._scope or {}).get("root_path", "") + path  # as a client would send it
        scope = dict(self._scope or {}) | {
            "type": "http", "method": "POST", "path": full, "raw_path": full.encode(),
            "query_string": query,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
        done = asyncio.Event()
        sent = False
        status = None

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await done.wait()  # no disconnect while the request runs
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        try:
            await self.app(scope, receive, send)
        except Exception as err:  # a refusal vLLM raises rather than answers (no session open)
            return f"raised {type(err).__name__}: {err}"[:300]
        finally:
            done.set()
        return str(status)


async def _answer(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"error": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
