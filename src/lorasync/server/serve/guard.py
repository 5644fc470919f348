"""`TokenGuard`: the ASGI middleware `lorasync serve` adds with vLLM's `--middleware`.

vLLM's weight-update routes need VLLM_SERVER_DEV_MODE=1, which also opens development routes
(`/collective_rpc` runs any worker method, `/sleep`, `/wake_up`, ...). The guard gives each
caller only what it needs: liveness probes to anyone; with the inference token, the OpenAI
API, the tokenizer routes, metrics and vLLM's token route (`INFERENCE_PATHS`); with the admin
token, those and the routes of a sync (`ADMIN_PATHS`); the development routes to no one,
unless the server was started with `lorasync serve --allow-dev-routes` (then to the admin
token), and vLLM's runtime LoRA routes only with `--allow-runtime-lora` (admin token). Every
list is exact: a route a new vLLM adds is closed until someone adds it here.

Paths are matched as Starlette routes them (`route_path`: the path less the ASGI root_path),
so `vllm --root-path /v1` cannot make `/v1/collective_rpc` look like an OpenAI route.

The routes whose body names an address for the server to connect back to
(`CALLBACK_FIELDS`) are read here first: the address must be the caller's own, unless the
server was started with `--allow-callback-anywhere` (`callback_refusal`).

Runs inside the server; imports nothing of lorasync's trainer side.

For tests only: with LORASYNC_ROUTES_FILE set in the server's environment, the guard writes
every route of the app it guards, and the app's middleware, to that file at startup
(`app_routes`), so tests/server/serve/test_routes.py can check each live route against the guard.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from typing import Any

from lorasync.server import ADMIN_TOKEN_ENV, TOKEN_ENV

# Routes anyone may call: liveness probes only. Everything else, the OpenAI API included,
# needs a token: a dev-mode server can be reconfigured through its other routes.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version"})
# With the inference token (or the admin token): the OpenAI API of vLLM 0.32 for a generating
# model, its tokenizer routes, metrics, and vLLM's token route (server/client/tokens.py). Exact paths
# ({name}: one path segment). Reviewed against the live app by tests/server/serve/test_routes.py.
INFERENCE_PATHS = frozenset({
    "/metrics", "/tokenize", "/detokenize",
    "/v1/models", "/v1/completions", "/v1/completions/render", "/v1/completions/derender",
    "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/chat/completions/render",
    "/v1/chat/completions/derender", "/v1/responses", "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/cancel", "/v1/responses/render", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/messages/render", "/v1/systemone",
    "/inference/v1/generate",
})
# With the admin token only: what a lorasync client calls for a sync (server/client/engine.py,
# server/client/control.py, server/transport_*.py). They pause the server and replace its weights.
ADMIN_PATHS = frozenset({
    "/pause", "/resume", "/reset_prefix_cache", "/weight_info",
    "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
})
# vLLM's runtime LoRA routes (VLLM_ALLOW_RUNTIME_LORA_UPDATING): they load any adapter folder
# the server can read. Admin token, and only with `lorasync serve --allow-runtime-lora`.
RUNTIME_LORA_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
# Routes whose JSON body names, under this field, a host for the server to connect back to
# (receiver.Endpoint: the TCP transport's listener, a read-back's).
CALLBACK_FIELDS = {"/init_weight_transfer_engine": "init_info", "/update_weights": "update_info"}
# The largest body of those routes the guard reads (it holds it to replay it to vLLM): an
# NCCL manifest rides in /update_weights' body, and wire.MAX_MANIFEST_BYTES (16 MiB) bounds
# it; 1 MiB more for its JSON wrapper. Larger: 413, unread. Only admin callers get this far.
MAX_CALLBACK_BODY_BYTES = 17 << 20
# Set by `lorasync serve --allow-dev-routes`: every route opens to the admin token's holder.
DEV_ROUTES_ENV = "LORASYNC_ALLOW_DEV_ROUTES"
# Set by `lorasync serve --allow-runtime-lora`: RUNTIME_LORA_PATHS open to the admin token.
RUNTIME_LORA_ENV = "LORASYNC_ALLOW_RUNTIME_LORA"
# Set by `lorasync serve --allow-callback-anywhere`: the server connects back to any address
# a caller names (behind a proxy or NAT the caller's address is not the listener's).
CALLBACK_ANYWHERE_ENV = "LORASYNC_ALLOW_CALLBACK_ANYWHERE"
# Set by tests: the file the guard writes the guarded app's routes to at startup.
ROUTES_FILE_ENV = "LORASYNC_ROUTES_FILE"


def _templates(paths: frozenset[str]) -> list[re.Pattern]:
    return [re.compile("^" + re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(p)) + "$") for p in paths if "{" in p]


_INFERENCE_TEMPLATES = _templates(INFERENCE_PATHS)


def route_path(scope: dict) -> str:
    """The path Starlette routes a request by: `path` less the ASGI `root_path` (the same
    rule as starlette._utils.get_route_path, which is private)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def access(path: str, runtime_lora: bool = False) -> str | None:
    """Who may reach the routed `path` on a server without dev routes: "public", "inference"
    (either token), "admin" (the admin token), or None (no one: a development route)."""
    if path in PUBLIC_PATHS:
        return "public"
    if path in INFERENCE_PATHS or any(t.match(path) for t in _INFERENCE_TEMPLATES):
        return "inference"
    if path in ADMIN_PATHS or (runtime_lora and path in RUNTIME_LORA_PATHS):
        return "admin"
    return None


def allowed(path: str, runtime_lora: bool = False) -> bool:
    """Whether a token (the admin token, for some) opens the routed `path` on a server without
    dev routes."""
    return access(path, runtime_lora) is not None


def same_host(host: object, peer: str | None) -> bool:
    """Whether a callback `host` (as a caller wrote it) is the `peer` address a request came
    from: the same IP address (an IPv4-mapped IPv6 address is its IPv4 one); from a loopback
    peer (a caller on this machine), any loopback address or "localhost". Any other name is
    refused: it could resolve anywhere."""
    if not isinstance(host, str) or not peer:
        return False
    try:
        theirs = ipaddress.ip_address(peer)
    except ValueError:
        return False
    theirs = getattr(theirs, "ipv4_mapped", None) or theirs
    if host == "localhost":
        return theirs.is_loopback
    try:
        named = ipaddress.ip_address(host)
    except ValueError:
        return False
    named = getattr(named, "ipv4_mapped", None) or named
    return named == theirs or (named.is_loopback and theirs.is_loopback)


def callback_refusal(path: str, body: bytes, peer: str | None) -> tuple[int, str] | None:
    """The status and the reason the guard refuses a request to a CALLBACK_FIELDS route whose
    `body` came from `peer`, or None: the body must be a JSON object (no key twice: vLLM must
    read what was checked; 400), and a callback host in it must be the peer's address (403)."""

    def unique(pairs: list) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a key appears twice in an object: {sorted(keys)}"[:200])
        return dict(pairs)

    try:
        request = json.loads(body, object_pairs_hook=unique)
    except (ValueError, RecursionError) as err:
        return 400, f"{path}: the body must be one JSON object ({type(err).__name__}: {err})"[:300]
    if not isinstance(request, dict):
        return 400, f"{path}: the body must be one JSON object, got {type(request).__name__}"
    info = request.get(CALLBACK_FIELDS[path])
    if not isinstance(info, dict) or "host" not in info or same_host(info["host"], peer):
        return None  # no address to connect to (NCCL, a discard; vLLM refuses other shapes)
    return 403, (
        f"{path}: the server connects back only to the address a request comes from ({peer}), "
        f"not to {str(info['host'])[:100]!r}; set the client's callback_host to this machine's "
        "address as the server sees it, or start the server with `lorasync serve "
        "--allow-callback-anywhere` (a proxy or NAT between them)"
    )


class TokenGuard:
    """ASGI middleware: every route but PUBLIC_PATHS needs `Authorization: Bearer <token>`;
    the inference token opens INFERENCE_PATHS, the admin token those and ADMIN_PATHS (and,
    with LORASYNC_ALLOW_DEV_ROUTES=1, every route; with LORASYNC_ALLOW_RUNTIME_LORA=1, the
    runtime LoRA routes). A callback address must be the caller's (`callback_refusal`) unless
    LORASYNC_ALLOW_CALLBACK_ANYWHERE=1.

    The tokens come from the LORASYNC_TOKEN and LORASYNC_ADMIN_TOKEN environment variables of
    the server process (`lorasync serve` sets them; the command line would show them in `ps`);
    without an admin token the token is the admin token too. Without LORASYNC_TOKEN every
    guarded route is refused: a misconfigured server fails closed.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.token = os.environ.get(TOKEN_ENV, "").encode()
        self.admin_token = os.environ.get(ADMIN_TOKEN_ENV, "").encode() or self.token
        if not self.token:
            self.admin_token = b""  # fails closed, whatever else is set
        self.dev_routes = os.environ.get(DEV_ROUTES_ENV) == "1"
        self.runtime_lora = os.environ.get(RUNTIME_LORA_ENV) == "1"
        self.callback_anywhere = os.environ.get(CALLBACK_ANYWHERE_ENV) == "1"
        self.routes_file = os.environ.get(ROUTES_FILE_ENV)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" and self.routes_file and "app" in scope:
            _write_routes(scope["app"], self.routes_file)  # the app is whole by startup
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = route_path(scope)
        need = access(path, self.runtime_lora)
        if need == "public":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        # both compared every time, in constant time
        admin = bool(self.admin_token) and hmac.compare_digest(given, b"Bearer " + self.admin_token)
        inference = bool(self.token) and hmac.compare_digest(given, b"Bearer " + self.token)
        if need is None and self.dev_routes:
            need = "admin"
        if (need == "admin" and admin) or (need == "inference" and (admin or inference)):
            if path in CALLBACK_FIELDS and scope["type"] == "http" and not self.callback_anywhere:
                receive = await self._check_callback(scope, path, receive, send)
                if receive is None:
                    return  # refused
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if inference and need == "admin":
            return await _refuse(send, 403, (
                f"{path} needs the server's admin token (lorasync serve --admin-token-file); "
                "this token opens the inference routes only. Clients: engine.admin_token_file "
                "(train) or --admin-token-file (sync-check)"
            ))
        if inference or admin:
            return await _refuse(send, 403, (
                f"{path} is a development route lorasync does not use; it is closed "
                "even to the token's holder. Start the server with `lorasync serve "
                "--allow-dev-routes` to open it to the admin token"
                + ("" if path not in RUNTIME_LORA_PATHS else
                   ", or with --allow-runtime-lora to open the runtime LoRA routes only")
            ))
        detail = (
            "this server was started without LORASYNC_TOKEN, so every route but "
            f"{sorted(PUBLIC_PATHS)} is closed; restart it with `lorasync serve --token-file PATH`"
            if not self.token
            else "missing or wrong token: send the header 'Authorization: Bearer <token>' "
            "(openai client: api_key=<token>)"
        )
        await _refuse(send, 401, detail)

    async def _check_callback(self, scope: dict, path: str, receive: Any, send: Any) -> Any:
        """Read the request's body (up to MAX_CALLBACK_BODY_BYTES) and check its callback
        address; return a `receive` that replays what was read, or None once refused."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # http.disconnect: the app sees it too
            size += len(message.get("body", b""))
            if size > MAX_CALLBACK_BODY_BYTES:
                await _refuse(send, 413, (
                    f"{path}: a body over {MAX_CALLBACK_BODY_BYTES} bytes "
                    "(guard.MAX_CALLBACK_BODY_BYTES)"
                ))
                return None
            if not message.get("more_body", False):
                break
        if messages[-1]["type"] == "http.request":
            body = b"".join(m.get("body", b"") for m in messages)
            client = scope.get("client")
            refusal = callback_refusal(path, body, client[0] if client else None)
            if refusal is not None:
                await _refuse(send, *refusal)
                return None
        pending = list(messages)

        async def replay() -> dict:
            return pending.pop(0) if pending else await receive()

        return replay


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
