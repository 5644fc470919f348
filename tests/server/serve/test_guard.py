"""`TokenGuard` gives each caller only what it needs: probes to anyone; with the inference
token, the OpenAI API; with the admin token, lorasync's sync routes too; vLLM's development
routes to no one unless the server was started with --allow-dev-routes; and a callback only to
the caller's own address. An ASGI app stands in for vLLM's (the live server's refusals:
tests/server/serve/test_routes.py, tests/server/client/test_engine.py)."""

import asyncio
import json

import pytest

from lorasync.server import ADMIN_TOKEN_ENV, TOKEN_ENV
from lorasync.server.serve.guard import (
    ADMIN_PATHS,
    CALLBACK_ANYWHERE_ENV,
    DEV_ROUTES_ENV,
    MAX_CALLBACK_BODY_BYTES,
    ROUTES_FILE_ENV,
    RUNTIME_LORA_ENV,
    TokenGuard,
    app_routes,
    route_path,
)
from lorasync.server.serve.launch import VLLM_RUNTIME_LORA_ENV, serve_env
from lorasync.server.transports.wire import MAX_MANIFEST_BYTES
from tests.helpers import read_body

TOKEN = "s3cret"
ADMIN = "adm1n"
INFERENCE = ["/v1/completions", "/v1/models", "/v1/chat/completions", "/v1/responses/resp_1",
             "/tokenize", "/metrics", "/inference/v1/generate"]
SYNC = ["/pause", "/resume", "/reset_prefix_cache", "/weight_info", "/init_weight_transfer_engine",
        "/start_weight_update", "/update_weights", "/finish_weight_update"]
USED = INFERENCE + SYNC
DEV = ["/collective_rpc", "/sleep", "/wake_up", "/weight_checker", "/reset_mm_cache",
       "/abort_requests", "/server_info", "/update_weight_version", "/is_sleeping",
       "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/no_such_route", "/v1/"]
PEER = "10.1.2.3"


def request(path: str, token: str | None = TOKEN, monkeypatch=None, root_path: str = "",
            body: bytes = b"{}", chunk: int | None = None, peer: str | None = PEER,
            **env: str | None) -> tuple[int, str, bytes | None]:
    """What the guard does with a request for `path`: its status (200: it reached the app),
    the refusal's text, and the body the app read (None: it did not read one). The server's
    environment: the token TOKEN, and `env` (name=value; None: unset)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    for name in (ADMIN_TOKEN_ENV, DEV_ROUTES_ENV, RUNTIME_LORA_ENV, CALLBACK_ANYWHERE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    read = []

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            read.append(await read_body(receive))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    chunk = chunk or max(len(body), 1)
    messages = [{"type": "http.request", "body": body[i:i + chunk], "more_body": i + chunk < len(body)}
                for i in range(0, max(len(body), 1), chunk)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path, "headers": headers,
             "client": (peer, 50000) if peer else None}
    asyncio.run(TokenGuard(app)(scope, receive, send))
    text = "".join(m.get("body", b"").decode() for m in sent[1:])
    return sent[0]["status"], text, read[0] if read else None


def status(path: str, token: str | None = TOKEN, monkeypatch=None, **kwargs) -> int:
    return request(path, token, monkeypatch, **kwargs)[0]


@pytest.mark.parametrize("path", USED)
def test_the_token_opens_what_lorasync_and_the_openai_api_use(path, monkeypatch):
    """With one token (no admin token), it opens the inference and the sync routes alike."""
    assert status(path, monkeypatch=monkeypatch) == 200
    assert status(path, token=None, monkeypatch=monkeypatch) == 401
    assert status(path, token="wrong", monkeypatch=monkeypatch) == 401


@pytest.mark.parametrize("path", INFERENCE)
def test_either_token_opens_the_inference_routes(path, monkeypatch):
    assert status(path, monkeypatch=monkeypatch, LORASYNC_ADMIN_TOKEN=ADMIN) == 200
    assert status(path, token=ADMIN, monkeypatch=monkeypatch, LORASYNC_ADMIN_TOKEN=ADMIN) == 200


@pytest.mark.parametrize("path", SYNC)
def test_the_sync_routes_need_the_admin_token(path, monkeypatch):
    """A server with an admin token: the inference token cannot pause it or replace its weights."""
    code, text, _ = request(path, monkeypatch=monkeypatch, LORASYNC_ADMIN_TOKEN=ADMIN)
    assert code == 403 and "admin token" in text
    assert status(path, token=ADMIN, monkeypatch=monkeypatch, LORASYNC_ADMIN_TOKEN=ADMIN) == 200
    assert status(path, token="wrong", monkeypatch=monkeypatch, LORASYNC_ADMIN_TOKEN=ADMIN) == 401
    assert set(SYNC) == ADMIN_PATHS


@pytest.mark.parametrize("path", DEV)
def test_development_routes_are_closed_even_with_the_token_unless_allowed(path, monkeypatch):
    assert status(path, monkeypatch=monkeypatch) == 403
    assert status(path, token=None, monkeypatch=monkeypatch) == 401
    assert status(path, monkeypatch=monkeypatch, LORASYNC_ALLOW_DEV_ROUTES="1") == 200
    # with an admin token, --allow-dev-routes opens them to it alone
    with_admin = {"LORASYNC_ALLOW_DEV_ROUTES": "1", "LORASYNC_ADMIN_TOKEN": ADMIN}
    assert status(path, monkeypatch=monkeypatch, **with_admin) == 403
    assert status(path, token=ADMIN, monkeypatch=monkeypatch, **with_admin) == 200


def test_the_probes_are_public(monkeypatch):
    assert status("/health", token=None, monkeypatch=monkeypatch) == 200
    assert status("/v1/health", token=None, monkeypatch=monkeypatch, root_path="/v1") == 200


@pytest.mark.parametrize("path", ["/v1/collective_rpc", "/v1/sleep", "/v1/pause", "/v1/v1/load_lora_adapter"])
def test_a_root_path_does_not_disguise_a_route(path, monkeypatch):
    """Starlette routes by the path less the root path: under `--root-path /v1`,
    /v1/collective_rpc is /collective_rpc, a development route (and /v1/pause a sync route)."""
    assert route_path({"path": path, "root_path": "/v1"}) == path.removeprefix("/v1")
    assert status(path, monkeypatch=monkeypatch, root_path="/v1", LORASYNC_ADMIN_TOKEN=ADMIN) == 403
    # and what the root path holds routes as usual
    assert status("/v1/v1/completions", monkeypatch=monkeypatch, root_path="/v1") == 200


def test_route_path_is_starlettes():
    from starlette._utils import get_route_path

    for path in ("/v1/x", "/v1", "/v1x/y", "/a/v1/b", "/", ""):
        for root in ("", "/v1", "/v1/"):
            scope = {"path": path, "root_path": root}
            assert route_path(scope) == get_route_path(scope), scope


def test_the_runtime_lora_routes_open_only_with_their_flag(monkeypatch):
    monkeypatch.setenv(VLLM_RUNTIME_LORA_ENV, "1")  # inherited from the shell: dropped
    monkeypatch.setenv(RUNTIME_LORA_ENV, "1")
    env = serve_env(TOKEN)
    assert VLLM_RUNTIME_LORA_ENV not in env and RUNTIME_LORA_ENV not in env
    env = serve_env(TOKEN, allow_runtime_lora=True)
    assert env[VLLM_RUNTIME_LORA_ENV] == "1" and env[RUNTIME_LORA_ENV] == "1"
    lora = {"LORASYNC_ALLOW_RUNTIME_LORA": "1", "LORASYNC_ADMIN_TOKEN": ADMIN}
    assert status("/v1/load_lora_adapter", token=ADMIN, monkeypatch=monkeypatch, **lora) == 200
    assert status("/v1/load_lora_adapter", monkeypatch=monkeypatch, **lora) == 403  # inference token
    assert status("/v1/load_lora_adapter", token=ADMIN, monkeypatch=monkeypatch, LORASYNC_ADMIN_TOKEN=ADMIN) == 403


def test_only_the_flags_open_the_development_routes_and_any_callback(monkeypatch):
    monkeypatch.setenv(DEV_ROUTES_ENV, "1")  # inherited from the shell: not enough
    monkeypatch.setenv(CALLBACK_ANYWHERE_ENV, "1")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)  # only --admin-token-file (or the CLI's env lookup) sets it
    env = serve_env(TOKEN)
    assert DEV_ROUTES_ENV not in env and CALLBACK_ANYWHERE_ENV not in env and ADMIN_TOKEN_ENV not in env
    assert serve_env(TOKEN, allow_dev_routes=True)[DEV_ROUTES_ENV] == "1"
    assert serve_env(TOKEN, allow_callback_anywhere=True)[CALLBACK_ANYWHERE_ENV] == "1"
    assert serve_env(TOKEN, admin_token=ADMIN)[ADMIN_TOKEN_ENV] == ADMIN


def callback(field: str, host: object, **more) -> bytes:
    return json.dumps({field: {"host": host, "port": 4000, "nonce": "00" * 32, **more}}).encode()


@pytest.mark.parametrize("path,field", [("/init_weight_transfer_engine", "init_info"),
                                        ("/update_weights", "update_info")])
def test_the_server_connects_back_only_to_its_caller(path, field, monkeypatch):
    body = callback(field, PEER, mode="info")
    code, _, read = request(path, monkeypatch=monkeypatch, body=body, chunk=7)
    assert code == 200 and read == body  # the app reads the body the guard read, whole
    for host in ("10.9.9.9", "example.org", "127.0.0.1", "", None, ["10.1.2.3"], "10.1.2.3.nip.io"):
        code, text, read = request(path, monkeypatch=monkeypatch, body=callback(field, host))
        assert (code, read) == (403, None), host
        assert "--allow-callback-anywhere" in text and PEER in text
    # the flag lets a caller name another address (a proxy, NAT)
    anywhere = {"LORASYNC_ALLOW_CALLBACK_ANYWHERE": "1"}
    assert status(path, monkeypatch=monkeypatch, body=callback(field, "10.9.9.9"), **anywhere) == 200
    # the same address in IPv6's IPv4-mapped form; from this machine, any loopback address
    for host, peer in (("localhost", "127.0.0.1"), ("127.0.0.1", "::1"), ("::1", "127.0.0.1")):
        assert status(path, monkeypatch=monkeypatch, body=callback(field, host), peer=peer) == 200
    assert status(path, monkeypatch=monkeypatch, body=callback(field, "127.0.0.1"), peer="10.0.0.1") == 403
    assert status(path, monkeypatch=monkeypatch, body=callback(field, "::ffff:10.1.2.3")) == 200
    # no callback address (NCCL, a discard): nothing to check
    nccl = json.dumps({field: {"nccl": {"unique_id": "x"}}}).encode()
    assert status(path, monkeypatch=monkeypatch, body=nccl) == 200


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]",
    b'{"init_info": {"host": "10.1.2.3", "port": 1, "host": "10.9.9.9"}}',  # read one way, used another
    b'{"init_info": {"host": "10.1.2.3"}, "init_info": {"host": "10.9.9.9"}}',
])
def test_a_callback_body_the_guard_cannot_check_is_refused(body, monkeypatch):
    code, _, read = request("/init_weight_transfer_engine", monkeypatch=monkeypatch, body=body)
    assert (code, read) == (400, None)


def test_a_callback_body_over_the_cap_is_refused_unread(monkeypatch):
    assert MAX_CALLBACK_BODY_BYTES > MAX_MANIFEST_BYTES  # an NCCL manifest rides in /update_weights
    big = b" " * (MAX_CALLBACK_BODY_BYTES + 1)
    code, text, read = request("/update_weights", monkeypatch=monkeypatch, body=big, chunk=1 << 20)
    assert (code, read) == (413, None) and "MAX_CALLBACK_BODY_BYTES" in text


def test_no_peer_address_means_no_callback(monkeypatch):
    """Over a Unix socket there is no peer address to match: only the flag lets it connect."""
    body = callback("init_info", "127.0.0.1")
    assert status("/init_weight_transfer_engine", monkeypatch=monkeypatch, body=body, peer=None) == 403


def starlette_app():
    """A small app with every kind of route: HTTP, websocket, a mounted app with routes, and a
    mounted bare ASGI app (vLLM mounts its metrics so)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route, WebSocketRoute

    async def endpoint(request):
        pass

    async def bare(scope, receive, send):
        pass

    sub = Starlette(routes=[Route("/inner/{item}", endpoint, methods=["PUT"])])
    return Starlette(routes=[
        Route("/a", endpoint, methods=["POST"]), WebSocketRoute("/ws", endpoint),
        Mount("/sub", app=sub), Mount("/metrics", app=bare),
    ])


def test_app_routes_lists_every_kind_of_route_and_walks_mounts():
    assert app_routes(starlette_app()) == [
        {"path": "/a", "kind": "http", "methods": ["POST"]},
        {"path": "/ws", "kind": "websocket", "methods": []},
        {"path": "/sub", "kind": "mount", "methods": []},
        {"path": "/sub/inner/{item}", "kind": "http", "methods": ["PUT"]},
        {"path": "/metrics", "kind": "mount", "methods": []},
    ]


def test_the_guard_writes_the_apps_routes_at_startup_only_when_a_test_asks(tmp_path, monkeypatch):
    """What tests/server/serve/test_routes.py reads from the live server."""
    app, out = starlette_app(), tmp_path / "routes.json"
    app.add_middleware(TokenGuard)

    async def inner(scope, receive, send):
        pass

    def start() -> None:  # the lifespan scope Starlette hands its middleware at startup
        asyncio.run(TokenGuard(inner)({"type": "lifespan", "app": app}, None, None))

    monkeypatch.delenv(ROUTES_FILE_ENV, raising=False)
    start()
    assert not out.exists()
    monkeypatch.setenv(ROUTES_FILE_ENV, str(out))
    start()
    written = json.loads(out.read_text())
    assert written["routes"] == app_routes(app)
    assert written["middleware"] == ["lorasync.server.serve.guard.TokenGuard"]
