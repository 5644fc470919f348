"""Reading vLLM's token-route answers (`server/client/tokens.py`): spans to per-token versions; a
malformed answer is the server's error naming its field, and no answer is read past the cap."""

import json
import re

import httpx
import pytest

from lorasync.server.client import tokens
from lorasync.server.client.control import ServerSyncError
from lorasync.server.client.tokens import TokenGenerator, completion, version_number

URL = "http://127.0.0.1:1"


def choice(n: int, spans, finish: str = "stop") -> dict:
    return {
        "index": 0, "text": "x" * n, "token_ids": list(range(n)), "finish_reason": finish,
        "logprobs": {"content": [{"token": "x", "logprob": -float(i)} for i in range(n)]},
        "weight_versions": [{"version": v, "start": a, "end": b} for v, a, b in spans],
    }


def test_spans_become_one_version_per_token():
    """vLLM's "default" (the weights it started with) is version 0; a sync at token 3 splits."""
    c = completion(choice(5, [("default", 0, 3), ("1", 3, 5)], finish="length"), URL)
    assert c.versions == [0, 0, 0, 1, 1]
    assert c.logprobs == [0.0, -1.0, -2.0, -3.0, -4.0] and c.truncated and c.token_ids == [0, 1, 2, 3, 4]
    assert completion(choice(2, [("7", 0, 2)]), URL).versions == [7, 7]
    assert completion(choice(0, []), URL).versions == []
    assert version_number("12") == 12 and version_number("default") == 0


@pytest.mark.parametrize(
    "spans,message",
    [
        ([("1", 0, 2)], "weight versions over 2"),  # tokens 2..4 unlabelled
        ([("1", 0, 2), ("2", 3, 5)], "not contiguous"),  # a gap
        ([("1", 0, 3), ("2", 2, 5)], "not contiguous"),  # an overlap
        ([("1", 0, 6)], "not contiguous"),  # past the end
        ([], "weight versions over 0"),  # none at all
    ],
    ids=["short", "gap", "overlap", "past-end", "none"],
)
def test_spans_that_do_not_cover_the_tokens_exactly_are_refused(spans, message):
    """A token without exactly one version would be mislabelled: the server's answer is an
    error naming the server, not a guess."""
    with pytest.raises(ServerSyncError, match=message) as err:
        completion(choice(5, spans), URL)
    assert str(err.value).startswith(URL)


def test_a_malformed_choice_is_the_servers_error():
    bad = choice(2, [("1", 0, 2)])
    del bad["logprobs"]
    with pytest.raises(ServerSyncError, match="cannot read"):
        completion(bad, URL)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda c: c.pop("token_ids"), "token_ids: missing"),
        (lambda c: c.update(token_ids="012"), "token_ids: TypeError"),
        (lambda c: c.update(token_ids=[0, 1.5]), "token_ids: TypeError"),
        (lambda c: c["logprobs"].pop("content"), "logprobs.content"),
        (lambda c: c.update(logprobs=None), "logprobs.content"),
        (lambda c: c["logprobs"]["content"][0].update(logprob="high"), "logprob: TypeError"),
        (lambda c: c["weight_versions"][0].pop("start"), "weight_versions: missing"),
        (lambda c: c.update(weight_versions={"start": 0}), "weight_versions: TypeError"),
        (lambda c: c.pop("text"), "text: missing"),
        (lambda c: c.update(text=None), "text: a string"),
        (lambda c: c.pop("finish_reason"), "finish_reason: missing"),
    ],
    ids=["no-tokens", "tokens-str", "token-float", "no-content", "logprobs-null", "logprob-str",
         "span-start", "spans-object", "no-text", "text-null", "no-finish"],
)
def test_each_malformed_field_is_named(change, field):
    bad = choice(2, [("1", 0, 2)])
    change(bad)
    with pytest.raises(ServerSyncError, match="cannot read") as err:
        completion(bad, URL)
    assert field in str(err.value) and str(err.value).startswith(URL)


def generator(answer: bytes, status: int = 200) -> TokenGenerator:
    """A TokenGenerator whose server answers `answer` to every request."""
    gen = TokenGenerator([URL], "t", timeout=5)
    gen._http.close()
    gen._http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(status, content=answer)))
    return gen


def answer(*choices) -> bytes:
    return json.dumps({"choices": list(choices)}).encode()


def test_an_answer_is_read_in_index_order():
    first, second = choice(1, [("1", 0, 1)]), choice(2, [("2", 0, 2)])
    second["index"] = 1
    (got,) = generator(answer(second, first)).generate(0, [[1, 2]], 4, 1.0, n=2, seeds=[0])
    assert [c.versions for c in got] == [[1], [2, 2]]


@pytest.mark.parametrize(
    "body,message",
    [
        (b"<html>", "not JSON"),
        (b"[]", "choices: TypeError"),
        (b"{}", "choices: missing"),
        (json.dumps({"choices": {"0": 1}}).encode(), "choices: TypeError"),
        (json.dumps({"choices": [{"text": "x"}]}).encode(), "choices[].index: missing"),
        (json.dumps({"choices": [{"index": "0"}]}).encode(), "choices[].index: TypeError"),
        (json.dumps({"choices": [choice(1, [("1", 0, 1)])] * 2}).encode(), "completions [0, 0] for n=1"),
        (json.dumps({"choices": []}).encode(), "completions [] for n=1"),
    ],
    ids=["html", "list", "no-choices", "choices-object", "no-index", "index-str", "twice", "none"],
)
def test_a_malformed_answer_is_the_servers_error_naming_the_field(body, message):
    with pytest.raises(ServerSyncError, match=re.escape(message)) as err:
        generator(body).generate(0, [[1, 2]], 4, 1.0, n=1, seeds=[0])
    assert str(err.value).startswith(URL)


def test_an_answer_over_the_cap_is_refused_unread(monkeypatch):
    monkeypatch.setattr(tokens, "MAX_ANSWER_BYTES", 1000)
    big = answer(choice(1, [("1", 0, 1)]) | {"text": "x" * 2000})
    with pytest.raises(ServerSyncError, match="MAX_ANSWER_BYTES"):
        generator(big).generate(0, [[1, 2]], 4, 1.0, n=1, seeds=[0])
    with pytest.raises(ServerSyncError, match="MAX_ANSWER_BYTES"):  # an error answer too
        generator(b"e" * 2000, status=500).generate(0, [[1, 2]], 4, 1.0, n=1, seeds=[0])
    (got,) = generator(answer(choice(1, [("1", 0, 1)]))).generate(0, [[1, 2]], 4, 1.0, n=1, seeds=[0])
    assert got[0].versions == [1]
