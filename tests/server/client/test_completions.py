"""Generation and scoring through the servers' completions API (`server/client/completions.py`),
without vLLM: stand-in servers on loopback answer `/v1/completions` with what vLLM would, choices
out of order. The answer's choices come back grouped by prompt in index order, each with its
token ids, logprobs and truncation; scoring keeps each sequence's logprobs after its first
token; each request goes to the server and model it names; a server's failure is a
ServerSyncError naming it."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lorasync.server.client.completions import CompletionsClient
from lorasync.server.client.control import ServerSyncError


def choice(index: int, tokens: list[int], logprobs: list, finish: str = "stop") -> dict:
    return {
        "index": index, "text": f"t{index}", "token_ids": tokens, "finish_reason": finish,
        "logprobs": {"token_logprobs": logprobs, "tokens": [], "top_logprobs": [], "text_offset": []},
    }


class StandIn:
    """A server answering each POST to /v1/completions with `answer(request)` (a list of
    choices, or an int: that error status), recording the requests it took."""

    def __init__(self, answer) -> None:
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(request | {"path": self.path})
                out = answer(request)
                status = out if isinstance(out, int) else 200
                body = json.dumps({"error": {"message": "no"}} if isinstance(out, int) else {
                    "id": "c", "object": "text_completion", "created": 0, "model": request["model"],
                    "choices": out,
                }).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_ins():
    """Start stand-ins with `start(answer, ...)`; all are stopped after the test."""
    started = []

    def start(*answers) -> list[StandIn]:
        started.extend(StandIn(a) for a in answers)
        return started[-len(answers):]

    yield start
    for s in started:
        s.close()


def client(servers: list[StandIn], models: list[str] | None = None) -> CompletionsClient:
    models = models or [f"m{i}" for i in range(len(servers))]
    return CompletionsClient([(s.url, m) for s, m in zip(servers, models)], "token", timeout=5)


def test_generation_groups_the_choices_by_prompt_in_index_order(stand_ins):
    """2 prompts x n=2: choice i is prompt i // n's; they arrive reversed. Each carries its
    token ids and sampled logprobs, and "length" marks it truncated. The request asks for
    token ids and one logprob per token, with the prompts as ids."""

    def answer(request):
        return [choice(i, [10 * i, 10 * i + 1], [-0.1 * i, -0.2], "length" if i == 2 else "stop")
                for i in reversed(range(len(request["prompt"]) * request["n"]))]

    (server,) = stand_ins(answer)
    c = client([server])
    out = c.generate(0, [[1, 2], (3,)], max_tokens=2, temperature=0.5, n=2, seeds=[None, None])
    c.close()
    assert [[x.token_ids for x in group] for group in out] == [[[0, 1], [10, 11]], [[20, 21], [30, 31]]]
    assert [[x.text for x in group] for group in out] == [["t0", "t1"], ["t2", "t3"]]
    assert out[1][0].logprobs == pytest.approx([-0.2, -0.2]) and out[0][1].logprobs == pytest.approx([-0.1, -0.2])
    assert [[x.truncated for x in group] for group in out] == [[False, False], [True, False]]
    (request,) = server.requests
    assert request["path"] == "/v1/completions" and request["model"] == "m0"
    assert request["prompt"] == [[1, 2], [3]] and request["return_token_ids"] is True
    assert (request["logprobs"], request["n"], request.get("seed"), request["max_tokens"]) == (0, 2, None, 2)


def test_seeded_prompts_go_one_request_each_with_their_own_seed(stand_ins):
    """vLLM gives every prompt of a request the request's seed (their samples would share
    random draws), so seeded prompts go one request each, answered in the prompts' order."""

    def answer(request):
        (prompt,) = request["prompt"]
        return [choice(i, [prompt[0], request["seed"]], [-0.1, -0.2]) for i in range(request["n"])]

    (server,) = stand_ins(answer)
    c = client([server])
    out = c.generate(0, [[1], [2], [3]], max_tokens=2, temperature=1.0, n=2, seeds=[7, 9, 11])
    c.close()
    assert [[x.token_ids for x in group] for group in out] == [[[1, 7]] * 2, [[2, 9]] * 2, [[3, 11]] * 2]
    assert sorted((r["prompt"], r["seed"]) for r in server.requests) == [([[1]], 7), ([[2]], 9), ([[3]], 11)]


def test_scoring_keeps_each_sequences_logprobs_after_its_first_token(stand_ins):
    """With echo, a choice's logprobs are the prompt's (the first None: no prefix) and then
    the one generated token's: a sequence of n tokens scores n - 1, in the order sent."""

    def answer(request):
        assert request["echo"] is True and request["max_tokens"] == 1
        return [choice(i, [0], [None, *(-float(t) for t in seq[1:]), -99.0])
                for i, seq in reversed(list(enumerate(request["prompt"])))]

    (server,) = stand_ins(answer)
    c = client([server])
    scores = c.score(0, [[5, 1, 2, 3], [6, 4]])
    c.close()
    assert scores == [[-1.0, -2.0, -3.0], [-4.0]]


def test_each_request_goes_to_the_server_and_model_it_names(stand_ins):
    first, second = stand_ins(lambda r: [choice(0, [1], [None, -1.0])], lambda r: [choice(0, [2], [-2.0])])
    c = client([first, second], models=["alpha", "beta"])
    assert c.generate(1, [[9]], max_tokens=1, temperature=1.0, n=1, seeds=[None])[0][0].token_ids == [2]
    assert c.score(0, [[9, 8]]) == [[-1.0]]
    c.close()
    assert [r["model"] for r in first.requests] == ["alpha"]
    assert [r["model"] for r in second.requests] == ["beta"]


def test_a_servers_failure_is_a_sync_error_naming_it(stand_ins):
    """An error status, or no server at all (a closed port): ServerSyncError naming the
    server's completions URL, not the openai client's own error."""
    (failing,) = stand_ins(lambda r: 500)
    gone = StandIn(lambda r: [])
    gone.close()  # nothing listens at its URL any more
    c = client([failing, gone])
    with pytest.raises(ServerSyncError, match="InternalServerError") as err:
        c.generate(0, [[1]], max_tokens=1, temperature=1.0, n=1, seeds=[None])
    assert str(err.value).startswith(f"{failing.url}/v1/completions: ")
    with pytest.raises(ServerSyncError, match="Is the server running") as err:
        c.score(1, [[1, 2]])
    assert str(err.value).startswith(f"{gone.url}/v1/completions: APIConnectionError")
    c.close()
