"""One server sync in two phases, all or none over the servers (what `ServerEngine` loads by).

1. Every server is paused (requests in flight finish first, or with in_flight="keep" are
   frozen), opens an update session and receives the payload, all at once: the transport
   reads and encodes each record once and writes it to every server (`TcpTransport.send`).
   Each server checks what it receives and loads nothing.
2. Only when all have it does each load it, take the new weight version and reset its prefix
   cache; then all resume.

If a transfer fails, every server drops what it received and keeps serving the previous
version: ServerSyncError says which server failed and why. The one window left is a server
dying while loading, after every transfer succeeded: the others then serve the new version
(`PartlyLoaded`, naming it). A client that dies between the phases leaves a session open
with its payload unloaded; the next client drops it (`open_session`).

Each `/pause` carries a lease (`pause_lease`): a server that hears nothing of the sync for
that long drops what it received and resumes by itself (`serve/lease.py`), so a client that dies
or stalls leaves no server paused for good. A server is counted paused before its `/pause`
is sent: one that does not answer in time (draining long requests) may be paused all the
same, and every server that may be is resumed when the sync fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lorasync.server.client.control import Control, ServerInfo, ServerSyncError
from lorasync.server.transports import Transport
from lorasync.sync.base import Record


# The shortest pause lease a sync asks for, in seconds, however short the client's timeout.
MIN_LEASE = 30.0


def pause_lease(timeout: float, servers: int) -> float:
    """The lease (seconds) a sync of `servers` servers asks of each one it pauses: how long a
    server waits with no request of the sync before it drops what it received and resumes.

    A request in flight holds the lease (a pause draining requests, a transfer), so the lease
    covers only the gaps between one server's requests, while the client talks to the others:
    at most one sweep over them, each step bounded by the control `timeout` (the transfer's
    own deadline too, `TcpTransport.with_callback`), at most four steps for an update session
    opened over a stale one (`open_session`), and a transfer's answer `timeout` + 5 s. Too
    short a lease would resume a server under a live client (which then fails its sync,
    refused: `lease.REFUSED_AFTER_EXPIRY`), so it is generous: 4 x (`timeout` + 5) per server.
    """
    return max(MIN_LEASE, 4 * (timeout + 5) * servers)


class PartlyLoaded(ServerSyncError):
    """Every server received the payload, and some failed to load it: the others serve the
    new version."""


def update(
    control: Control, transport: Transport, servers: Sequence[ServerInfo], records: Iterable[Record],
    declared: Sequence[Record], version: int, in_flight: str, lease: float | None = None,
) -> int:
    """Load `records` (as `declared`) into every server as `version`, all or none; return the
    bytes on each server's wire. Each server is paused with a lease of `lease` seconds
    (default `pause_lease`)."""
    if lease is None:
        lease = pause_lease(control.timeout, len(servers))
    params = {"mode": in_flight, "clear_cache": "true", "lease": f"{lease:g}"}
    paused: list[ServerInfo] = []
    failed = True
    try:
        for server in servers:
            # counted before it is sent: a /pause that times out here may pause the server
            # all the same once its requests drain, and must be undone with the others
            paused.append(server)
            control.call(server.url, "POST", "/pause", True, params=params)
        wire = receive(control, transport, servers, records, declared)
        errors = []
        for server in servers:
            try:
                control.call(server.url, "POST", "/finish_weight_update", json={"weight_version": str(version)})
                reset_prefix_cache(control, server.url, keep=in_flight == "keep")
            except ServerSyncError as err:
                errors.append(f"{err} (loading failed after every server received the payload)")
        if errors:
            raise PartlyLoaded("; ".join(errors))
        failed = False
    finally:
        for server in paused:
            try:
                control.call(server.url, "POST", "/resume", retry=True)
            except ServerSyncError:
                if not failed:
                    raise
                # else a dead server: the error that matters is already on its way
    return wire


def receive(
    control: Control, transport: Transport, servers: Sequence[ServerInfo], records: Iterable[Record],
    declared: Sequence[Record],
) -> int:
    """Phase 1: open an update session on each paused server and transfer `records` to them
    all (checked there, not loaded); return the bytes on each wire. On failure every session
    opened is closed, dropping what it received."""
    opened = []
    try:
        for server in servers:
            open_session(control, server)
            opened.append(server)
        return transport.send(servers, records, declared)
    except BaseException:
        # The worker closes its update session when the transfer fails on its side. When the
        # failure was on this side (a timeout, say) or on another server's, the session may
        # still be open and hold the whole payload, which a bare finish would load: drop it.
        for server in opened:
            discard(control, server)
        raise


def open_session(control: Control, server: ServerInfo) -> None:
    """Open an update session on `server`, dropping one a dead client left open."""
    try:
        control.call(server.url, "POST", "/start_weight_update")
    except ServerSyncError as err:
        if "already active" not in str(err):
            raise
        # A client died between the two phases of a sync and left its session open (and its
        # payload unloaded): drop that payload and start afresh.
        discard(control, server)
        control.call(server.url, "POST", "/start_weight_update")


def discard(control: Control, server: ServerInfo) -> None:
    """Drop the payload a server received, and close its session: nothing loads."""
    try:
        # retry: after an error answer the server drops the connection (see `Control.call`)
        control.call(server.url, "POST", "/update_weights", retry=True, json={"update_info": {"discard": True}})
        control.call(server.url, "POST", "/finish_weight_update", retry=True, json={})
    except ServerSyncError:
        pass  # it is failing too; the error that matters is already on its way


def reset_prefix_cache(control: Control, url: str, keep: bool) -> None:
    """Drop the KV blocks the old weights computed, so no request reuses them. With
    in_flight="keep" (`keep`) the frozen requests must not keep theirs either: they are
    preempted, and on resume recompute their prompt and tokens so far with the new weights,
    then go on, so each token is sampled by exactly the version it is labelled with. vLLM
    0.32's pause (clear_cache, deprecated there) already preempts them;
    `reset_running_requests` makes sure. vLLM refuses a reset while blocks are held: an error
    here, never ignored (tests/server/client/test_in_flight.py shows the stale KV a kept block
    leaves: 0.46 in a token's logprob)."""
    answer = control.json(url, "POST", "/reset_prefix_cache", params={"reset_running_requests": str(keep).lower()})
    if not (isinstance(answer, dict) and answer.get("success") is True):
        raise ServerSyncError(
            f"{url}/reset_prefix_cache did not reset ({answer!r}): new requests could reuse "
            "KV blocks of the old weights"[:400]
        )
