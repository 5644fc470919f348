"""`TokenGuard`: the ASGI middleware `lorasync serve` adds with vLLM's `--middleware`.

vLLM's weight-update routes need VLLM_SERVER_DEV_MODE=1, which also opens development routes
(`/collective_rpc` runs any worker method, `/sleep`, `/wake_up`, ...). The guard gives each
caller only what it needs: liveness probes to anyone; with the token, the OpenAI API and the
routes lorasync's client uses (`ALLOWED`); the development routes to no one, unless the server
was started with `lorasync serve --allow-dev-routes`. Runs inside the server; imports nothing
of lorasync's trainer side.

For tests only: with LORASYNC_ROUTES_FILE set in the server's environment, the guard writes
every route of the app it guards, and the app's middleware, to that file at startup
(`app_routes`), so tests/server/test_routes.py can check each live route against the guard.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from lorasync.server import TOKEN_ENV

# Routes anyone may call: liveness probes only. Everything else, the OpenAI API included,
# needs the token: a dev-mode server can be reconfigured through its other routes.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version"})
# With the token: the OpenAI API (and its tokenizer routes, metrics), vLLM's token route
# (server/tokens.py), and what a lorasync client calls for a sync (server/client.py,
# server/control.py, server/transport_*.py).
ALLOWED_PREFIXES = ("/v1/",)
ALLOWED_PATHS = frozenset({
    "/tokenize", "/detokenize", "/metrics", "/inference/v1/generate",
    "/pause", "/resume", "/reset_prefix_cache", "/weight_info",
    "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
})
# Set by `lorasync serve --allow-dev-routes`: every route opens to the token's holder.
DEV_ROUTES_ENV = "LORASYNC_ALLOW_DEV_ROUTES"
# Set by tests: the file the guard writes the guarded app's routes to at startup.
ROUTES_FILE_ENV = "LORASYNC_ROUTES_FILE"


def allowed(path: str) -> bool:
    """Whether a caller with the token may reach `path` on a server without dev routes."""
    return path in PUBLIC_PATHS or path in ALLOWED_PATHS or path.startswith(ALLOWED_PREFIXES)


class TokenGuard:
    """ASGI middleware: every route but PUBLIC_PATHS needs `Authorization: Bearer <token>`, and
    with it only the allowed ones open (all of them with LORASYNC_ALLOW_DEV_ROUTES=1).

    The token comes from the LORASYNC_TOKEN environment variable of the server process
    (`lorasync serve` sets it; the command line would show it in `ps`). Without it every
    guarded route is refused: a misconfigured server fails closed.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.token = os.environ.get(TOKEN_ENV, "").encode()
        self.dev_routes = os.environ.get(DEV_ROUTES_ENV) == "1"
        self.routes_file = os.environ.get(ROUTES_FILE_ENV)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and self.routes_file and "app" in scope:
            _write_routes(scope["app"], self.routes_file)  # the app is whole by startup
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        authorized = bool(self.token) and hmac.compare_digest(given, b"Bearer " + self.token)
        if authorized and (self.dev_routes or allowed(scope["path"])):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if authorized:
            return await _refuse(send, 403, (
                f"{scope['path']} is a development route lorasync does not use; it is closed "
                "even to the token's holder. Start the server with `lorasync serve "
                "--allow-dev-routes` to open it"
            ))
        detail = (
            "this server was started without LORASYNC_TOKEN, so every route but "
            f"{sorted(PUBLIC_PATHS)} is closed; restart it with `lorasync serve --token-file PATH`"
            if not self.token
            else "missing or wrong token: send the header 'Authorization: Bearer <token>' "
            "(openai client: api_key=<token>)"
        )
        await _refuse(send, 401, detail)


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"error": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def app_routes(app: Any, prefix: str = "") -> list[dict]:
    """Every route of a Starlette (FastAPI) app, mounted apps walked: {"path", "kind",
    "methods"}, kind "http", "websocket" or "mount" (a prefix: every path under it)."""
    out = []
    for route in getattr(app, "routes", []):
        path = prefix + getattr(route, "path", "")  # a Host route has none
        if hasattr(route, "methods"):  # an HTTP route; methods None: any (probed with GET)
            out.append({"path": path, "kind": "http", "methods": sorted(route.methods or ["GET"])})
        elif hasattr(route, "app") and hasattr(route, "routes"):  # a mount (or a host)
            out.append({"path": path, "kind": "mount", "methods": []})
            out += app_routes(route, path)
        else:
            out.append({"path": path, "kind": "websocket", "methods": []})
    return out


def _write_routes(app: Any, path: str) -> None:
    """The app's routes and its middleware, outermost first, as JSON (whole or not at all)."""
    middleware = [f"{m.cls.__module__}.{m.cls.__qualname__}" for m in getattr(app, "user_middleware", [])]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"routes": app_routes(app), "middleware": middleware}, f)
    os.replace(tmp, path)
