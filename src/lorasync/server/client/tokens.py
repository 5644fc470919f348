"""Generation through vLLM's token-in, token-out route, with per-token weight versions.

`POST /inference/v1/generate` (vLLM's scale-out API; `lorasync serve` enables it and the
guard opens it to the token's holder) takes one prompt's token ids and `SamplingParams`, and
answers each completion's tokens, text, sampling logprobs and `weight_versions`: spans of
output-token indexes, each labelled with the weight version that sampled them. vLLM stamps
every engine step's output with the version its weights carry (the label `/finish_weight_update`
set), so a sync landing while a request runs (pause mode "keep") shows as two spans. The
OpenAI completions API does not return these spans; that is why this route.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx

from lorasync.server.client.control import ServerSyncError
from lorasync.sync.base import Completion

ROUTE = "/inference/v1/generate"
MAX_PARALLEL = 64  # requests in flight per batch: one per prompt
# The largest answer to one prompt the client reads (decoded): n completions of max_tokens
# tokens each, ~200 bytes a token (its id, text, a logprob entry), so 64 MiB holds n x
# max_tokens up to ~300k tokens; a server cannot make the client allocate more.
MAX_ANSWER_BYTES = 64 << 20
T = TypeVar("T")


def version_number(label: str) -> int:
    """The weight version a server's label names: lorasync's syncs label them 1, 2, ...;
    vLLM labels the weights it started with "default", which is version 0."""
    return int(label) if label.isdigit() else 0


class _Malformed(ValueError):
    """A field of the route's answer that is missing or of the wrong kind (its path named)."""


def _read(field: str, get: Callable[[], T]) -> T:
    """`get()`, any failure to read the answer becoming _Malformed naming `field`."""
    try:
        return get()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        problem = f"missing ({err})" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise _Malformed(f"{field}: {problem}") from None


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"{value!r:.40} is not an integer")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r:.40} is not a number")
    return float(value)


def _list(value: object) -> list:
    if not isinstance(value, list):
        raise TypeError(f"a list was expected, got {type(value).__name__}")
    return value


def _unreadable(url: str, err: object) -> ServerSyncError:
    return ServerSyncError(f"{url}{ROUTE}: an answer lorasync cannot read ({err})"[:400])


def completion(choice: dict, url: str) -> Completion:
    """One choice of the route's answer, its spans expanded to one version per token; a
    ServerSyncError naming the field that is missing or wrong, if the choice is malformed."""
    try:
        tokens = _read("token_ids", lambda: [_int(t) for t in _list(choice["token_ids"])])
        logprobs = _read("logprobs.content[].logprob",
                         lambda: [_number(e["logprob"]) for e in _list(choice["logprobs"]["content"])])
        spans = _read("weight_versions", lambda: [
            (_int(span["start"]), _int(span["end"]), version_number(str(span["version"])))
            for span in _list(choice["weight_versions"] or [])
        ])
        text = _read("text", lambda: choice["text"])
        if not isinstance(text, str):
            raise _Malformed(f"text: a string was expected, got {type(text).__name__}")
        finish = _read("finish_reason", lambda: choice["finish_reason"])
    except _Malformed as err:
        raise _unreadable(url, err) from None
    versions = [0] * len(tokens)
    covered = 0
    for start, end, version in spans:
        if start != covered or not start <= end <= len(tokens):
            raise _unreadable(url, f"weight version spans not contiguous over the tokens: {choice['weight_versions']}")
        versions[start:end] = [version] * (end - start)
        covered = end
    if covered != len(tokens) or len(logprobs) != len(tokens):
        raise _unreadable(url, f"{len(tokens)} tokens, {len(logprobs)} logprobs, weight versions over {covered}")
    return Completion(token_ids=tokens, text=text, logprobs=logprobs, truncated=finish == "length", versions=versions)


def choices(answer: bytes, url: str, n: int) -> list[dict]:
    """The route's answer (JSON bytes) as its `n` choices, in index order; ServerSyncError
    naming what is missing or wrong otherwise."""
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError) as err:
        raise _unreadable(url, f"not JSON: {type(err).__name__}: {err}") from None
    try:
        listed = _read("choices", lambda: _list(parsed["choices"]))
        indexes = _read("choices[].index", lambda: [_int(c["index"]) for c in listed])
    except _Malformed as err:
        raise _unreadable(url, err) from None
    if sorted(indexes) != list(range(n)):
        raise ServerSyncError(f"{url}{ROUTE}: completions {sorted(indexes)[:10]} for n={n}"[:300])
    return [c for _, c in sorted(zip(indexes, listed), key=lambda ic: ic[0])]


class TokenGenerator:
    """Completions with per-token weight versions from one or more servers (by index)."""

    def __init__(self, urls: Sequence[str], token: str, timeout: float) -> None:
        self.urls = list(urls)
        self._http = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
            limits=httpx.Limits(max_connections=MAX_PARALLEL),
        )

    def generate(
        self, index: int, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float,
        n: int, seeds: Sequence[int | None],
    ) -> list[list[Completion]]:
        """`n` completions of each prompt from server `index`, one request per prompt, each
        sampled with its own seed."""
        url = self.urls[index]

        def one(prompt: Sequence[int], seed: int | None) -> list[Completion]:
            params = {"max_tokens": max_tokens, "temperature": temperature, "n": n, "seed": seed, "logprobs": 0}
            body = {"token_ids": list(prompt), "sampling_params": params, "output_mode": "text"}
            try:
                status, answer = self._post(url + ROUTE, body)
            except httpx.HTTPError as err:
                raise ServerSyncError(f"{url}{ROUTE}: {type(err).__name__}: {err or 'no answer'}") from None
            if answer is None:
                raise ServerSyncError(
                    f"{url}{ROUTE}: the answer is over the client's limit of {MAX_ANSWER_BYTES} "
                    "bytes (tokens.MAX_ANSWER_BYTES); ask for fewer or shorter completions per prompt"
                )
            if status != 200:
                raise ServerSyncError(
                    f"{url}{ROUTE} answered {status}: {answer[:300].decode(errors='replace')}. "
                    "in_flight='keep' needs servers started by `lorasync serve` of this version "
                    "(it enables vLLM's token route, --enable-scale-out)"
                )
            return [completion(c, url) for c in choices(answer, url, n)]

        with ThreadPoolExecutor(min(MAX_PARALLEL, len(prompts)) or 1) as pool:
            return list(pool.map(one, prompts, seeds))

    def _post(self, url: str, body: dict) -> tuple[int, bytes | None]:
        """POST `body`; the status and the answer read to at most MAX_ANSWER_BYTES (None past that)."""
        with self._http.stream("POST", url, json=body) as streamed:
            answer = bytearray()
            for chunk in streamed.iter_bytes():
                answer += chunk
                if len(answer) > MAX_ANSWER_BYTES:
                    return streamed.status_code, None
            return streamed.status_code, bytes(answer)

    def close(self) -> None:
        self._http.close()
