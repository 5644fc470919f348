"""`TokenGuard` gives each caller only what it needs: probes to anyone; with the token, the
OpenAI API and lorasync's sync routes; vLLM's development routes to no one unless the server
was started with --allow-dev-routes. An ASGI app stands in for vLLM's (the live server's
refusals: tests/server/test_client.py)."""

import asyncio
import json

import pytest

from lorasync.server import TOKEN_ENV
from lorasync.server.guard import DEV_ROUTES_ENV, ROUTES_FILE_ENV, TokenGuard, app_routes
from lorasync.server.launch import serve_env

TOKEN = "s3cret"
USED = ["/v1/completions", "/v1/models", "/pause", "/resume", "/reset_prefix_cache", "/weight_info",
        "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update"]
DEV = ["/collective_rpc", "/sleep", "/wake_up", "/weight_checker", "/reset_mm_cache",
       "/abort_requests", "/server_info", "/update_weight_version", "/is_sleeping"]


def status(path: str, token: str | None = TOKEN, dev_routes: bool = False, monkeypatch=None) -> int:
    """The HTTP status the guard gives a request for `path` (200: it reached the app)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    if dev_routes:
        monkeypatch.setenv(DEV_ROUTES_ENV, "1")
    else:
        monkeypatch.delenv(DEV_ROUTES_ENV, raising=False)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    scope = {"type": "http", "path": path, "headers": headers}
    asyncio.run(TokenGuard(app)(scope, None, send))
    return sent[0]["status"]


@pytest.mark.parametrize("path", USED)
def test_the_token_opens_what_lorasync_and_the_openai_api_use(path, monkeypatch):
    assert status(path, monkeypatch=monkeypatch) == 200
    assert status(path, token=None, monkeypatch=monkeypatch) == 401
    assert status(path, token="wrong", monkeypatch=monkeypatch) == 401


@pytest.mark.parametrize("path", DEV)
def test_development_routes_are_closed_even_with_the_token_unless_allowed(path, monkeypatch):
    assert status(path, monkeypatch=monkeypatch) == 403
    assert status(path, token=None, monkeypatch=monkeypatch) == 401
    assert status(path, dev_routes=True, monkeypatch=monkeypatch) == 200


def test_probes_are_public(monkeypatch):
    assert status("/health", token=None, monkeypatch=monkeypatch) == 200


def test_only_the_flag_opens_the_development_routes(monkeypatch):
    monkeypatch.setenv(DEV_ROUTES_ENV, "1")  # inherited from the shell: not enough
    assert DEV_ROUTES_ENV not in serve_env(TOKEN)
    assert serve_env(TOKEN, allow_dev_routes=True)[DEV_ROUTES_ENV] == "1"


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
    """What tests/server/test_routes.py reads from the live server."""
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
    assert written["middleware"] == ["lorasync.server.guard.TokenGuard"]
