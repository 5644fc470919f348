"""`TokenGuard` gives each caller only what it needs: probes to anyone; with the token, the
OpenAI API and lorasync's sync routes; vLLM's development routes to no one unless the server
was started with --allow-dev-routes. An ASGI app stands in for vLLM's (the live server's
refusals: tests/server/test_client.py)."""

import asyncio

import pytest

from lorasync.server import TOKEN_ENV
from lorasync.server.guard import DEV_ROUTES_ENV, TokenGuard
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
