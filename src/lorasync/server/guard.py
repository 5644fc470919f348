"""`TokenGuard`: the ASGI middleware `lorasync serve` adds with vLLM's `--middleware`.

vLLM's weight-update routes need VLLM_SERVER_DEV_MODE=1, which also opens development routes
(`/collective_rpc` runs any worker method, `/sleep`, `/wake_up`, ...). The guard gives each
caller only what it needs: liveness probes to anyone; with the token, the OpenAI API and the
routes lorasync's client uses (`ALLOWED`); the development routes to no one, unless the server
was started with `lorasync serve --allow-dev-routes`. Runs inside the server; imports nothing
of lorasync's trainer side.
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
# With the token: the OpenAI API (and its tokenizer routes, metrics), and what a lorasync
# client calls for a sync (server/client.py, server/control.py, server/transport_*.py).
ALLOWED_PREFIXES = ("/v1/",)
ALLOWED_PATHS = frozenset({
    "/tokenize", "/detokenize", "/metrics",
    "/pause", "/resume", "/reset_prefix_cache", "/weight_info",
    "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
})
# Set by `lorasync serve --allow-dev-routes`: every route opens to the token's holder.
DEV_ROUTES_ENV = "LORASYNC_ALLOW_DEV_ROUTES"


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

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
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
            f"{sorted(PUBLIC_PATHS)} is closed; restart it with `lorasync serve --token`"
            if not self.token
            else "missing or wrong token: send the header 'Authorization: Bearer <token>' "
            "(openai client: api_key=<token>)"
        )
        await _refuse(send, 401, detail)


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"error": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
