"""Reading vLLM's token-route answers (`server/tokens.py`): spans to per-token versions."""

import pytest

from lorasync.server.control import ServerSyncError
from lorasync.server.tokens import completion, version_number

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
