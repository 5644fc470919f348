"""The pause lease (issue #27 item 2): a server paused by a client that then dies, stalls or
gives up resumes by itself (`server/serve/lease.py`), and the client resumes every server it may
have paused (`server/client/update.py`).

The middleware's logic first, on a fake ASGI app with leases of a fraction of a second (no
vLLM, under a second in all); then, marked `vllm`, one real `lorasync serve` for the module:
a client SIGKILLed with a sync's payload received, a `/pause` the client gives up on while
long requests drain, and four OpenAI clients generating through a lease's expiry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
import torch
from openai import OpenAI

from lorasync.server.client import update
from lorasync.server.client.engine import ServerEngine
from lorasync.server.client.control import Control, ServerSyncError
from lorasync.server.serve.lease import EXPIRY, PauseLease
from lorasync.sync.factors import lora_records
from lorasync.sync.verify import probe_sequences, trainer_scores, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import TOKEN, kill_at_stop, max_diff, read_body, train_step

TOL = 1e-4  # float32 server
DISCARD_THEN_RESUME = [path for path, _, _ in EXPIRY]

# --- the middleware, on a fake app --------------------------------------------------------------


class FakeApp:
    """An ASGI app that records each request (path, query, JSON body) and answers `status[path]`
    (default 200); a request to a path in `hold` waits until that event is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.status: dict[str, int] = {}
        self.hold: dict[str, asyncio.Event] = {}
        self.raises: set[str] = set()
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        body = await read_body(receive)
        self.scopes.append(scope)
        self.calls.append((scope["path"], scope["query_string"].decode(), json.loads(body) if body else None))
        if scope["path"] in self.hold:
            await self.hold[scope["path"]].wait()
        if scope["path"] in self.raises:
            raise RuntimeError("start_weight_update must be called before update_weights.")
        await send({"type": "http.response.start", "status": self.status.get(scope["path"], 200), "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.calls]


async def request(lease: PauseLease, path: str, query: str = "", root_path: str = "") -> int:
    """One POST through the middleware, as uvicorn hands it one (under `root_path`, as
    `lorasync serve --root-path` mounts the app: the path keeps it); the status answered."""
    status = None
    scope = {
        "type": "http", "method": "POST", "path": root_path + path, "raw_path": (root_path + path).encode(),
        "root_path": root_path, "query_string": query.encode(), "headers": [], "app": "the FastAPI app",
        "state": {},
    }

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await lease(scope, receive, send)
    return status


def run(scenario) -> tuple[FakeApp, PauseLease]:
    """Run `scenario(app, lease)` (a coroutine function) on a fresh event loop."""
    app = FakeApp()
    lease = PauseLease(app)
    asyncio.run(scenario(app, lease))
    return app, lease


def test_a_lease_runs_out_and_the_server_discards_then_resumes_itself(caplog):
    async def scenario(app, lease):
        assert await request(lease, "/pause", "mode=wait&lease=0.2") == 200
        assert await request(lease, "/start_weight_update") == 200
        await asyncio.sleep(0.1)
        assert app.paths() == ["/pause", "/start_weight_update"]  # not yet
        await asyncio.sleep(0.25)

    with caplog.at_level(logging.WARNING, logger="lorasync.server.serve.lease"):
        app, lease = run(scenario)
    assert app.paths() == ["/pause", "/start_weight_update", *DISCARD_THEN_RESUME]
    assert DISCARD_THEN_RESUME == ["/update_weights", "/finish_weight_update", "/reset_prefix_cache", "/resume"]
    # the same calls as the client's `update.discard`, then a reset and the resume
    assert app.calls[2][2] == {"update_info": {"discard": True}} and app.calls[3][2] == {}
    assert app.calls[4][1] == "reset_running_requests=true"
    # inside the server: the arming request's scope (its app, its state), no token needed
    assert all(s["app"] == "the FastAPI app" and s["method"] == "POST" for s in app.scopes[2:])
    assert lease.expiries == 1 and lease.seconds is None
    assert "pause lease of 0.2 s ran out" in caplog.text and "ended: resumed" in caplog.text


def test_under_a_root_path_the_routed_path_arms_and_expiry_calls_under_it():
    """With `--root-path /v1` a client's /pause arrives as /v1/pause (root_path /v1): the lease
    matches the routed path, as the guard does, and its own calls go under the root too.
    Checked to fail matching the raw scope["path"] (nothing armed)."""
    async def scenario(app, lease):
        assert await request(lease, "/pause", "mode=wait&lease=0.1", root_path="/v1") == 200
        await asyncio.sleep(0.3)

    app, lease = run(scenario)
    assert app.paths() == ["/v1/pause", *("/v1" + p for p in DISCARD_THEN_RESUME)]
    assert lease.expiries == 1


def test_a_pause_without_a_lease_arms_nothing():
    async def scenario(app, lease):
        await request(lease, "/pause", "mode=wait")
        await request(lease, "/start_weight_update")
        await asyncio.sleep(0.3)

    app, lease = run(scenario)
    assert app.paths() == ["/pause", "/start_weight_update"] and lease.expiries == 0


def test_each_request_of_the_update_renews_the_lease():
    async def scenario(app, lease):
        await request(lease, "/pause", "lease=0.2")
        for path in ("/start_weight_update", "/update_weights", "/finish_weight_update", "/reset_prefix_cache", "/pause"):
            await asyncio.sleep(0.12)  # 0.72 s in all: three leases and more
            await request(lease, path)
        assert lease.expiries == 0
        await asyncio.sleep(0.3)
        assert lease.expiries == 1

    app, _ = run(scenario)
    assert app.paths()[-4:] == DISCARD_THEN_RESUME


def test_a_request_in_flight_holds_the_lease():
    """A transfer longer than the lease: the countdown starts when it answers, whatever
    answers meanwhile."""

    async def scenario(app, lease):
        app.hold["/update_weights"] = released = asyncio.Event()
        await request(lease, "/pause", "lease=0.15")
        transfer = asyncio.ensure_future(request(lease, "/update_weights"))
        await asyncio.sleep(0.1)
        await request(lease, "/pause")  # another request answers meanwhile: the transfer still holds
        await asyncio.sleep(0.4)
        assert lease.in_flight == 1 and lease.expiries == 0
        released.set()
        await transfer
        del app.hold["/update_weights"]  # the expiry's own discard must not wait
        await asyncio.sleep(0.05)
        assert lease.expiries == 0  # 0.15 s from the answer, not from the request
        await asyncio.sleep(0.2)
        assert lease.expiries == 1

    run(scenario)


def test_a_resume_ends_the_lease_and_a_failed_one_does_not():
    async def scenario(app, lease):
        await request(lease, "/pause", "lease=0.15")
        assert await request(lease, "/resume") == 200
        await asyncio.sleep(0.3)
        assert lease.expiries == 0
        await request(lease, "/pause", "lease=0.15")
        app.status["/resume"] = 500  # e.g. vLLM refusing a resume while a pause is in flight
        assert await request(lease, "/resume") == 500
        await asyncio.sleep(0.3)
        assert lease.expiries == 1

    run(scenario)


def test_a_resume_releases_a_pause_still_in_flight():
    """A /pause the client gave up on may wait for an idle engine long after its /resume:
    it must not hold the next sync's lease."""

    async def scenario(app, lease):
        app.hold["/pause"] = drained = asyncio.Event()
        stale = asyncio.ensure_future(request(lease, "/pause", "lease=0.1"))
        await asyncio.sleep(0.05)
        assert await request(lease, "/resume") == 200
        assert lease.in_flight == 0 and lease.seconds is None
        del app.hold["/pause"]
        await request(lease, "/pause", "lease=0.1")  # the next sync, then its client dies
        await asyncio.sleep(0.25)
        assert lease.expiries == 1, "the stale pause held the lease"
        drained.set()
        await stale
        await asyncio.sleep(0.2)
        assert lease.expiries == 1

    run(scenario)


def test_a_pause_that_fails_drops_the_lease_it_armed():
    async def scenario(app, lease):
        app.status["/pause"] = 500
        assert await request(lease, "/pause", "lease=0.1") == 500
        await asyncio.sleep(0.25)

    app, lease = run(scenario)
    assert lease.expiries == 0 and app.paths() == ["/pause"]


@pytest.mark.parametrize("bad", ["0", "-3", "nan", "inf", "soon", ""])
def test_a_lease_that_is_not_a_positive_number_is_refused_unforwarded(bad):
    async def scenario(app, lease):
        assert await request(lease, "/pause", f"mode=wait&lease={bad}") == 400

    app, lease = run(scenario)
    assert app.calls == [] and lease.seconds is None


def test_after_an_expiry_the_rest_of_that_update_is_refused_until_the_next_pause():
    async def scenario(app, lease):
        await request(lease, "/pause", "lease=0.1")
        await asyncio.sleep(0.25)
        assert lease.expiries == 1
        for path in ("/start_weight_update", "/update_weights", "/finish_weight_update"):
            assert await request(lease, path) == 409, path  # a slow client loads nothing now
        assert await request(lease, "/reset_prefix_cache") == 200  # harmless: let through
        assert await request(lease, "/pause", "lease=0.1") == 200  # a new sync
        assert await request(lease, "/start_weight_update") == 200

    app, _ = run(scenario)
    assert app.paths()[-3:] == ["/reset_prefix_cache", "/pause", "/start_weight_update"]


def test_an_expiry_goes_on_when_vllm_raises_and_stops_when_a_new_sync_pauses():
    async def scenario(app, lease):
        app.raises.add("/update_weights")  # no update session open: vLLM raises
        await request(lease, "/pause", "lease=0.1")
        await asyncio.sleep(0.25)
        assert app.paths()[-4:] == DISCARD_THEN_RESUME
        app.raises.clear()
        app.hold["/update_weights"] = released = asyncio.Event()
        await request(lease, "/pause", "lease=0.1")
        await asyncio.sleep(0.2)  # the expiry's discard is waiting now
        await request(lease, "/pause", "lease=5")  # a new client's sync begins
        released.set()
        await asyncio.sleep(0.1)

    app, lease = run(scenario)
    # the first expiry ran whole despite the raise; the second stopped after its discard
    assert app.paths()[-2:] == ["/update_weights", "/pause"]
    assert app.paths().count("/resume") == 1, "the expiry resumed a server a new sync had paused"
    assert lease.seconds == 5


def test_other_routes_and_scopes_pass_through_untouched():
    async def scenario(app, lease):
        await request(lease, "/pause", "lease=0.1")
        assert await request(lease, "/v1/completions") == 200
        assert await request(lease, "/init_weight_transfer_engine") == 200
        await asyncio.sleep(0.05)
        assert lease.in_flight == 0 and lease.expiries == 0  # not a request of the update

    run(scenario)


def test_the_client_asks_a_lease_that_covers_a_sweep_over_the_other_servers():
    assert update.pause_lease(60, 1) == 260 and update.pause_lease(60, 2) == 520
    assert update.pause_lease(1, 1) == update.MIN_LEASE


class Refusing:
    """A Control whose /pause on `url` never answers in time; records every call."""

    def __init__(self, url: str) -> None:
        self.timeout, self.url, self.calls = 1.0, url, []

    def call(self, url, method, path, retry=False, **kwargs):
        self.calls.append((url, path, kwargs.get("params")))
        if path == "/pause" and url == self.url:
            raise ServerSyncError(f"{url}/pause: ReadTimeout (within 1 s)")
        return httpx.Response(200, json={"success": True})


def test_a_pause_that_timed_out_is_undone_with_the_others():
    """The second of three servers does not answer its /pause in time: the sync fails, and
    both servers it may have paused are resumed (not only the one that answered)."""
    servers = [type("S", (), {"url": f"http://s{i}"})() for i in range(3)]
    control = Refusing("http://s1")
    with pytest.raises(ServerSyncError, match="s1/pause"):
        update.update(control, None, servers, [], [], 1, "wait", lease=7)
    pauses = [(url, params) for url, path, params in control.calls if path == "/pause"]
    assert pauses == [(f"http://s{i}", {"mode": "wait", "clear_cache": "true", "lease": "7"}) for i in (0, 1)]
    assert [url for url, path, _ in control.calls if path == "/resume"] == ["http://s0", "http://s1"]


# --- on a real server ---------------------------------------------------------------------------


def weight_version(url: str) -> str:
    return httpx.get(f"{url}/weight_info", headers={"Authorization": f"Bearer {TOKEN}"}).json()["weight_version"]


# A trainer-side client that syncs the records in argv[2] (torch.save'd) with a pause lease of
# argv[3] seconds and stops before loading them (every server holds the payload, unloaded),
# prints "stopped" and waits there to be killed.
DYING_CLIENT = """
import sys, time, torch
from lorasync.server.client import update
from lorasync.server.client.engine import ServerEngine
from lorasync.server.client.control import Control

url, records, lease = sys.argv[1:4]
call = Control.call
def call_then_stop(self, u, method, path, retry=False, **kwargs):
    if path == "/finish_weight_update":
        print("stopped", flush=True)
        time.sleep(600)
    return call(self, u, method, path, retry, **kwargs)

Control.call = call_then_stop
update.pause_lease = lambda timeout, servers: float(lease)
ServerEngine(url).load_records(torch.load(records, weights_only=False))
raise SystemExit("the sync ran to the end")
"""


@pytest.mark.vllm
def test_a_client_killed_with_its_payload_received_leaves_a_server_that_resumes_on_its_version(
    server, trainer, tmp_path
):
    """A client paused the server with a 3 s lease, sent it a whole payload and was SIGKILLed
    before loading it: within the lease + 5 s the server serves /v1/completions again, on its
    last complete version (its version and every logprob unchanged: the payload was dropped,
    not loaded), and the next client syncs to parity. Checked able to fail: with the expiry's
    resume dropped from `EXPIRY`, the completion waited out its 30 s timeout; with the
    expiry's discard dropped, its bare finish loaded the dead client's payload (the
    logprobs moved by up to 10.3)."""
    engine = ServerEngine(server.url, TOKEN)
    sync = WeightSync(trainer, engine, "factors")
    before = sync().version
    probes = probe_sequences(engine.vocab_size)
    scores = engine.score(probes)
    train_step(trainer, scale=0.2)
    torch.save(list(lora_records(sync.merger, sync.plan, engine.dtype)), tmp_path / "records.pt")
    assert max_diff(trainer_scores(trainer, probes), scores) > 1e-2  # a load would show

    line = kill_at_stop(DYING_CLIENT, [server.url, str(tmp_path / "records.pt"), "3"], tmp_path / "dying.log")
    killed = time.monotonic()
    assert line == "stopped\n", (tmp_path / "dying.log").read_text()[-3000:]

    with OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=30) as client:
        out = client.completions.create(model=engine._servers[0].model, prompt=probes[0], max_tokens=4)
    served = time.monotonic() - killed
    assert out.choices[0].text is not None and served <= 3 + 5, f"served again after {served:.1f} s"
    assert weight_version(server.url) == str(before)
    assert max_diff(engine.score(probes), scores) == 0.0  # dropped, not loaded
    assert "pause lease of 3 s ran out" in server.log.read_text(errors="replace")

    train_step(trainer)
    assert sync().version == before + 1  # the next client: paused afresh, nothing refused
    assert verify(trainer, engine, probes).max_abs_diff <= TOL
    engine.close()


def running_now(url: str) -> None:
    """Return once the server runs a request (its metrics say so); a request sent to a cold
    server can take a second to reach the engine."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
        if any(line.startswith("vllm:num_requests_running{") and float(line.split()[-1]) > 0
               for line in metrics.splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError("the long generation did not start within 30 s")


@pytest.mark.vllm
def test_a_pause_the_client_gave_up_on_while_requests_drain_is_undone_by_the_client(server):
    """A long generation runs; a sync's /pause (mode wait) cannot answer before it ends, and
    the client, with a 0.3 s timeout, gives up. The server is paused all the same; the client's
    failure path resumes it, so a request sent after answers at once, long before the lease
    (600 s here) would. Checked able to fail: with the server counted paused only once its
    /pause answered (as before), the request waited out its 30 s timeout."""
    model = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["data"][0]["id"]
    info = type("S", (), {"url": server.url})()
    done = {}

    def long_generation() -> None:
        with OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=600) as client:
            start = time.monotonic()
            client.completions.create(  # 4 x 64 sequences of 480 tokens: 5 to 9 s for 64 under load,
                # under 1 s for 64 on a quiet machine: 256, so a 0.3 s /pause cannot see it end
                model=model, prompt=[[5, 6, 7]] * 4, max_tokens=480, n=64, extra_body={"ignore_eos": True}
            )
            done["seconds"] = time.monotonic() - start

    long = threading.Thread(target=long_generation)
    long.start()
    running_now(server.url)
    control = Control(TOKEN, timeout=0.3)
    start = time.monotonic()
    try:
        with pytest.raises(ServerSyncError, match="/pause: ReadTimeout"):
            update.update(control, None, [info], [], [], 1, "wait", lease=600)
        assert "seconds" not in done, "the generation ended before the pause: make it longer"
        with OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=30) as client:
            client.completions.create(model=model, prompt=[8, 9], max_tokens=4)
        answered = time.monotonic() - start
    finally:
        long.join(timeout=600)
        control.call(server.url, "POST", "/resume", retry=True)  # whatever happened: not paused for 600 s
        control.close()
    assert done["seconds"] > 2 and answered < 30


@pytest.mark.vllm
def test_four_openai_clients_see_no_failed_request_through_a_lease_expiry(server):
    """Four threads generate without a break while the server is paused with a 2 s lease (an
    update session open) and left so: their requests wait, then run once the lease ran out;
    none fails, and the server keeps its version. Checked able to fail: with the expiry's
    /resume dropped from `EXPIRY`, every request after the pause waited out its 20 s timeout."""
    version = weight_version(server.url)
    model = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["data"][0]["id"]
    answers, failures, stop = [], [], threading.Event()

    def keep_generating(seed: int) -> None:
        with OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=20) as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    client.completions.create(model=model, prompt=[seed, seed + 1, seed + 2], max_tokens=8)
                    answers.append(time.monotonic() - start)
                except Exception as err:  # every failure counts, whatever raised it
                    failures.append(f"{type(err).__name__}: {err}")

    clients = [threading.Thread(target=keep_generating, args=(10 * i + 3,)) for i in range(4)]
    for c in clients:
        c.start()
    control = Control(TOKEN, timeout=30)
    try:
        time.sleep(1)
        control.call(server.url, "POST", "/pause", params={"mode": "wait", "clear_cache": "true", "lease": "2"})
        control.call(server.url, "POST", "/start_weight_update")  # and its client is gone
        paused = time.monotonic()
        time.sleep(5)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
        control.close()
    assert not any(c.is_alive() for c in clients), "a client still waits for an answer"
    assert not failures, f"{len(failures)} failed requests, the first: {failures[0]}"
    assert max(answers) >= 1.5, "no request waited through the pause"
    assert len(answers) >= 12 and time.monotonic() - paused >= 5
    assert weight_version(server.url) == version
