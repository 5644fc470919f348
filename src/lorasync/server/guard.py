"""`TokenGuard`: the ASGI middleware `lorasync serve` adds with vLLM's `--middleware`.

vLLM's weight-update routes need VLLM_SERVER_DEV_MODE=1, which also opens unguarded
development routes; the guard closes every route but liveness probes to anyone without the
token. Runs inside the server; imports nothing of lorasync's trainer side.
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


class TokenGuard:
    """ASGI middleware: every route but PUBLIC_PATHS needs `Authorization: Bearer <token>`.

    The token comes from the LORASYNC_TOKEN environment variable of the server process
    (`lorasync serve` sets it; the command line would show it in `ps`). Without it every
    guarded route is refused: a misconfigured server fails closed.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.token = os.environ.get(TOKEN_ENV, "").encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        if self.token and hmac.compare_digest(given, b"Bearer " + self.token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        detail = (
            "this server was started without LORASYNC_TOKEN, so every route but "
            f"{sorted(PUBLIC_PATHS)} is closed; restart it with `lorasync serve --token`"
            if not self.token
            else "missing or wrong token: send the header 'Authorization: Bearer <token>' "
            "(openai client: api_key=<token>)"
        )
        body = json.dumps({"error": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
