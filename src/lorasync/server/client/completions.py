"""Generation and scoring through the servers' OpenAI-compatible completions API.

Token ids in and out (`return_token_ids`), each sampled token's logprob (`logprobs=0`); for
scoring, `echo=True` gives the logprob of every token of a sequence given its prefix. Used by
`ServerEngine` unless syncs land in flight (then `tokens.py`, whose answers carry versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from lorasync.server.client.control import ServerSyncError
from lorasync.sync.base import Completion

MAX_PARALLEL = 64  # seeded requests in flight per batch: one per prompt


class CompletionsClient:
    """The official `openai` client of each server (by index), bounded by `timeout` seconds."""

    def __init__(self, servers: Sequence[tuple[str, str]], token: str, timeout: float) -> None:
        """`servers`: (base URL, served model name) of each."""
        from openai import OpenAI

        self.urls = [url for url, _ in servers]
        self.models = [model for _, model in servers]
        self._clients = [
            OpenAI(base_url=f"{url}/v1", api_key=token, timeout=timeout, max_retries=0) for url, _ in servers
        ]

    def generate(
        self, index: int, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float,
        n: int, seeds: Sequence[int | None],
    ) -> list[list[Completion]]:
        """`n` completions of each prompt from server `index`: unseeded, in one request; seeded,
        one request per prompt (in parallel), each with its own seed: vLLM gives every prompt
        of one request the request's seed, so prompts would share their random draws."""
        if all(seed is None for seed in seeds):
            return self._generate(index, prompts, max_tokens, temperature, n, None)
        with ThreadPoolExecutor(min(MAX_PARALLEL, len(prompts)) or 1) as pool:
            return [group for out in pool.map(
                lambda p, s: self._generate(index, [p], max_tokens, temperature, n, s), prompts, seeds,
            ) for group in out]

    def _generate(
        self, index: int, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float,
        n: int, seed: int | None,
    ) -> list[list[Completion]]:
        out = self._create(
            index, prompt=[list(p) for p in prompts], max_tokens=max_tokens,
            temperature=temperature, n=n, seed=seed, logprobs=0, extra_body={"return_token_ids": True},
        )
        choices = sorted(out.choices, key=lambda c: c.index)
        return [
            [
                Completion(
                    token_ids=list(c.token_ids), text=c.text, logprobs=list(c.logprobs.token_logprobs),
                    truncated=c.finish_reason == "length",
                )
                for c in choices[p * n : (p + 1) * n]
            ]
            for p in range(len(prompts))
        ]

    def score(self, index: int, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Logprob of each token given its prefix (tokens 1..n-1), on server `index`."""
        out = self._create(
            index, prompt=[list(s) for s in sequences], echo=True,
            logprobs=0, max_tokens=1, temperature=1.0,
            # token ids instead of echoed text: no detokenizing of the prompt, which fails
            # for ids the tokenizer lacks (random models of a real shape have a small one)
            extra_body={"return_token_ids": True},
        )
        choices = sorted(out.choices, key=lambda c: c.index)
        return [c.logprobs.token_logprobs[1 : len(s)] for c, s in zip(choices, sequences)]

    def _create(self, index: int, **request):
        """One completions request to server `index`; any failure names the server."""
        from openai import APIError

        try:
            return self._clients[index].completions.create(model=self.models[index], **request)
        except APIError as err:
            raise ServerSyncError(
                f"{self.urls[index]}/v1/completions: {type(err).__name__}: {err}. Is the server running?"
            ) from None

    def close(self) -> None:
        for client in self._clients:
            client.close()
