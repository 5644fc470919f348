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

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from lorasync.server.control import ServerSyncError
from lorasync.sync.base import Completion

ROUTE = "/inference/v1/generate"
MAX_PARALLEL = 64  # requests in flight per batch: one per prompt


def version_number(label: str) -> int:
    """The weight version a server's label names: lorasync's syncs label them 1, 2, ...;
    vLLM labels the weights it started with "default", which is version 0."""
    return int(label) if label.isdigit() else 0


def completion(choice: dict, url: str) -> Completion:
    """One choice of the route's answer, its spans expanded to one version per token."""
    try:
        tokens = [int(t) for t in choice["token_ids"]]
        logprobs = [float(e["logprob"]) for e in choice["logprobs"]["content"]]
        versions = [0] * len(tokens)
        covered = 0
        for span in choice["weight_versions"] or []:
            start, end = int(span["start"]), int(span["end"])
            if start != covered or not start <= end <= len(tokens):
                raise ValueError(f"weight version spans not contiguous over the tokens: {choice['weight_versions']}")
            versions[start:end] = [version_number(str(span["version"]))] * (end - start)
            covered = end
        if covered != len(tokens) or len(logprobs) != len(tokens):
            raise ValueError(
                f"{len(tokens)} tokens, {len(logprobs)} logprobs, weight versions over {covered}"
            )
        return Completion(
            token_ids=tokens, text=str(choice["text"]), logprobs=logprobs,
            truncated=choice["finish_reason"] == "length", versions=versions,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ServerSyncError(f"{url}{ROUTE}: an answer lorasync cannot read ({type(err).__name__}: {err})"[:400]) from None


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
        n: int, seed: int | None,
    ) -> list[list[Completion]]:
        """`n` completions of each prompt from server `index`, one request per prompt."""
        url = self.urls[index]
        params = {"max_tokens": max_tokens, "temperature": temperature, "n": n, "seed": seed, "logprobs": 0}

        def one(prompt: Sequence[int]) -> list[Completion]:
            body = {"token_ids": list(prompt), "sampling_params": params, "output_mode": "text"}
            try:
                response = self._http.post(url + ROUTE, json=body)
            except httpx.HTTPError as err:
                raise ServerSyncError(f"{url}{ROUTE}: {type(err).__name__}: {err or 'no answer'}") from None
            if response.status_code != 200:
                raise ServerSyncError(
                    f"{url}{ROUTE} answered {response.status_code}: {response.text[:300]}. "
                    "in_flight='keep' needs servers started by `lorasync serve` of this version "
                    "(it enables vLLM's token route, --enable-scale-out)"
                )
            choices = sorted(response.json()["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise ServerSyncError(f"{url}{ROUTE}: {len(choices)} completions for n={n}")
            return [completion(c, url) for c in choices]

        with ThreadPoolExecutor(min(MAX_PARALLEL, len(prompts)) or 1) as pool:
            return list(pool.map(one, prompts))

    def close(self) -> None:
        self._http.close()
