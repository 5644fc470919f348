"""The live app `lorasync serve` runs: every route is allowlisted or refused by the guard, and a
server started with --token-file and --admin-token-file takes those tokens and no other, the
inference token only for the inference routes.

The server runs with LORASYNC_ROUTES_FILE set, so the guard writes the routes of the app it
guards at startup, after vLLM attached every router and plugin (`guard.app_routes`): a route a
new vLLM adds is checked here without anyone listing it. Each route the token does not open
must answer 401 without the token and 403 with it (the guard refuses before vLLM sees the
request, so probing a development route changes nothing); each one it opens answers 401
without it, and a sync route 403 with the inference token; and the set the tokens open is
pinned (`OPEN`): the guard's lists are exact, so a route a new vLLM adds stays closed, and
one added to them fails here until it is reviewed. The guard's rules alone, on a stand-in
app: test_guard.py.
"""

import json
import re

import httpx
import pytest

from lorasync.server.client.engine import ServerEngine
from lorasync.server.client.control import ServerSyncError
from lorasync.server.serve.guard import PUBLIC_PATHS, ROUTES_FILE_ENV, access, allowed
from lorasync.server.serve.launch import MIDDLEWARE
from lorasync.sync.verify import probe_sequences
from tests.helpers import SERVER_ARGS, TOKEN, Server, openai_scores

pytestmark = pytest.mark.vllm
FILE_TOKEN = "file-token-9b2e"  # the server's; its environment holds TOKEN, which must not open it
ADMIN_TOKEN = "admin-token-77c1"  # the server's admin token (--admin-token-file)

# Every live route the tokens open (vLLM 0.32, a generating model), reviewed: the liveness
# probes (public), the OpenAI API under /v1/ and its tokenizer routes, metrics (the inference
# token), and the routes of a lorasync sync (the admin token). A route added to the guard's
# lists opens to a token's holders: review what it does before adding it here.
OPEN = {
    "/health", "/ping", "/version",
    "/metrics", "/tokenize", "/detokenize",
    "/pause", "/resume", "/reset_prefix_cache", "/weight_info",
    "/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update",
    "/v1/models", "/v1/completions", "/v1/completions/render", "/v1/completions/derender",
    "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/chat/completions/render",
    "/v1/chat/completions/derender", "/v1/responses", "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/cancel", "/v1/responses/render", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/messages/render", "/v1/systemone",
    "/inference/v1/generate",  # vLLM's token route: generation with per-token weight versions
}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """One `lorasync serve --token-file F --admin-token-file A` whose environment holds another
    token (TOKEN): the file wins. Yields the server and the routes its guard wrote at startup."""
    root = tmp_path_factory.mktemp("routes")
    token_file, admin_file, routes = root / "token", root / "admin", root / "routes.json"
    for file, token in ((token_file, FILE_TOKEN), (admin_file, ADMIN_TOKEN)):
        file.write_text(f"{token}\n")
        file.chmod(0o600)
    args = (*SERVER_ARGS, "--token-file", str(token_file), "--admin-token-file", str(admin_file))
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ROUTES_FILE_ENV, str(routes))
        started = Server(tiny_model("qwen2"), args, token=TOKEN).start()
    try:
        yield started.wait(), json.loads(routes.read_text())
    finally:
        started.kill()


def probe_paths(route: dict) -> list[str]:
    """Concrete paths that reach `route`: parameters filled in; for a mount, under it too."""
    path = re.sub(r"\{[^}]*\}", "x", route["path"])
    return [path, path.rstrip("/") + "/x"] if route["kind"] == "mount" else [path]


def test_a_server_started_with_token_files_takes_those_tokens_and_no_other(server):
    live, _ = server
    with pytest.raises(ServerSyncError, match="403.*admin token"):
        ServerEngine(live.url, FILE_TOKEN, timeout=30)  # the inference token cannot sync
    engine = ServerEngine(live.url, FILE_TOKEN, timeout=30, admin_token=ADMIN_TOKEN)
    probes = probe_sequences(engine.vocab_size, n=2, length=6)
    assert [len(s) for s in engine.score(probes)] == [5, 5]
    assert [len(s) for s in openai_scores(live.url, probes, token=FILE_TOKEN)] == [5, 5]
    engine.close()
    with pytest.raises(ServerSyncError, match="401"):
        ServerEngine(live.url, TOKEN, timeout=30, admin_token=TOKEN)  # the token of the server's environment
    r = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401
    # the server connects back only to its caller (here 127.0.0.1): the guard refuses the rest
    endpoint = {"host": "10.255.255.1", "port": 9, "nonce": "00" * 32}
    r = httpx.post(f"{live.url}/init_weight_transfer_engine", json={"init_info": endpoint},
                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 403 and "--allow-callback-anywhere" in r.text


def test_every_live_route_is_allowlisted_or_refused(server):
    live, dumped = server
    routes = dumped["routes"]
    paths = {r["path"] for r in routes}
    # the guard saw vLLM's whole app: its development, RL and OpenAI routes
    assert {"/collective_rpc", "/sleep", "/update_weights", "/v1/completions", "/metrics"} <= paths
    routes = routes + [{"path": "/no_such_route", "kind": "http", "methods": ["GET", "POST"]}]
    opened, wrong = set(), []
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for route in routes:
            for path in probe_paths(route):
                is_open = path in PUBLIC_PATHS or allowed(path)
                if is_open:
                    opened.add(route["path"])
                for method in route["methods"] or ["GET"]:
                    if path in PUBLIC_PATHS:
                        continue  # anyone's: no token to check
                    for headers in ({}, {"Authorization": "Bearer wrong"}):
                        status = http.request(method, path, headers=headers).status_code
                        if status != 401:
                            wrong.append(f"{method} {path} without the token: {status}, not 401")
                    if is_open and access(path) != "admin":
                        continue  # with the token it reaches vLLM: not called
                    r = http.request(method, path, headers={"Authorization": f"Bearer {FILE_TOKEN}"})
                    if is_open:  # a sync route: the guard refuses the inference token, vLLM sees nothing
                        if r.status_code != 403 or (method != "HEAD" and "admin token" not in r.text):
                            wrong.append(f"{method} {path} with the inference token: {r.status_code}, not 403")
                        continue  # with the admin token it reaches vLLM: not called (it could pause, sync)
                    if r.status_code != 403 or (method != "HEAD" and "--allow-dev-routes" not in r.text):
                        wrong.append(f"{method} {path} with the token: {r.status_code}, not the guard's 403")
    assert not wrong, "\n".join(wrong)
    assert opened == OPEN, (
        f"routes the token opens that nobody reviewed: {sorted(opened - OPEN)}; reviewed routes "
        f"the live app lacks: {sorted(OPEN - opened)}"
    )


def test_nothing_in_the_app_answers_before_the_guard(server):
    """Middleware added after the guard would run before it (Starlette's outermost is the
    last added): the guard must be the outermost, or a middleware could answer unguarded."""
    _, dumped = server
    assert dumped["middleware"][0] == MIDDLEWARE, dumped["middleware"]
