"""The episode runner: a batch of multi-turn episodes played against an engine.

Each episode starts from a prompt (token ids) and its dataset row. The policy's first turns
are one `generate` call, `n` completions per prompt (a GRPO group), exactly as a single-turn
batch. Then, in rounds: each open episode's environment gets its latest turn's text (in a
worker thread, at most `Limits.env_workers` at once, each step under `Limits.env_timeout`);
an answer is appended as tokens (`models.prompt.encode_reply`: the policy's sampled ids are kept as
they are); and every episode whose environment has answered takes its next turn, all in one
`generate` call, so the engine batches the turns of all episodes. An environment that is
slow does not hold the others: a round waits at most `GATHER` seconds for stragglers, which
join a later one.

An episode ends when its environment says so (`Reply.end`), after `Limits.max_turns` policy
turns, when its tokens reach `Limits.episode_tokens` (a reply that would leave no room for a
policy token is not added), or when its environment fails: it raises, answers after its
timeout, or returns something else than a `Reply`. A failed episode keeps its tokens, gets
reward 0 (`Episode.failed`), and its reason is logged; the batch goes on. A turn cut off by
the per-turn token limit goes to the environment like any other (the reply then closes the
assistant's turn in the template's way); the reward functions see the last one's cut as
`truncated`.

Every token after the prompt is recorded with who wrote it (`Episode.policy`: True on the
policy's own tokens, the only ones trained on and checked), the engine's sampling logprob
(0 on the environment's) and the weight version that sampled it: the engine's per-token
versions where it reports them (servers with `in_flight: keep`), else the version it served
when the turn was generated, so a sync between two turns shows in the versions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

from lorasync.environments.protocol import Environment, EnvironmentFactory, Reply
from lorasync.models.prompt import encode_reply
from lorasync.sync.base import Completion, Generator

log = logging.getLogger(__name__)

GATHER = 0.05  # seconds a round waits for environments still working before it generates


@dataclass(frozen=True)
class Limits:
    """Bounds of one episode, and of the environments' steps (named as `rollout.*` names
    them in a run's config)."""

    max_turns: int = 4  # policy turns
    max_tokens: int = 16  # tokens per policy turn
    episode_tokens: int = 256  # tokens after the prompt: the policy's and the environment's
    env_timeout: float = 10.0  # seconds per environment step (its construction included)
    env_workers: int = 8  # environment steps at once

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "episode_tokens", "env_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be >= 1")
        if not self.env_timeout > 0:
            raise ValueError(f"env_timeout = {self.env_timeout!r}: must be > 0 seconds")


@dataclass
class Episode:
    """One episode's tokens after its prompt, who wrote each, and how it ended."""

    row: dict
    prompt: list[int]
    token_ids: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)  # True: the policy sampled it
    logprobs: list[float] = field(default_factory=list)  # the engine's; 0.0 on the environment's
    versions: list[int] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)  # the policy's turns, as text
    replies: int = 0  # the environment's messages
    # the last turn was cut off by the per-turn token limit (its environment still answers it;
    # the reward functions see it as `truncated`)
    truncated: bool = False
    reward: float | None = None  # the environment's own, at the end
    end: str = ""  # why it ended: "environment", "max_turns", "episode_tokens", "failed"
    error: str = ""  # the failure, when end == "failed"
    env: Environment | None = None
    reply: Reply | None = None  # the environment's message, until it is appended

    @property
    def failed(self) -> bool:
        return self.end == "failed"

    @property
    def text(self) -> str:
        """The answer the reward functions judge: the policy's last turn."""
        return self.turns[-1] if self.turns else ""

    def add(self, completion: Completion, version: int) -> None:
        """The policy's turn: its sampled ids, logprobs and versions, as the engine gave them."""
        ids = list(completion.token_ids)
        self.token_ids += ids
        self.policy += [True] * len(ids)
        self.logprobs += list(completion.logprobs)
        self.versions += list(completion.versions) if len(completion.versions) == len(ids) else [version] * len(ids)
        self.turns.append(completion.text)
        self.truncated = completion.truncated

    def answer(self, ids: list[int]) -> None:
        """The environment's message, as tokens (context only: never trained on)."""
        last = self.versions[-1] if self.versions else 0
        self.token_ids += ids
        self.policy += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [last] * len(ids)
        self.replies += 1

    def completion(self) -> Completion:
        """Everything after the prompt as one `Completion` (the trainer scores it whole)."""
        return Completion(list(self.token_ids), self.text, list(self.logprobs), self.truncated, list(self.versions))

    def fail(self, reason: str) -> None:
        self.end, self.error, self.reward = "failed", reason, None
        log.warning("episode ended: %s", reason)


def run_episodes(
    engine: Generator,
    tokenizer,
    prompts: Sequence[list[int]],
    rows: Sequence[dict],
    make_env: EnvironmentFactory,
    limits: Limits,
    temperature: float,
    n: int = 1,
    seed: int | None = None,
) -> list[Episode]:
    """Play `n` episodes per prompt (group after group, as `rollout.generate` lays a batch
    out) to their ends; see the module's docstring."""
    episodes = [Episode(row, list(p)) for p, row in zip(prompts, rows) for _ in range(n)]
    version = engine.weight_version
    groups = engine.generate(list(prompts), min(limits.max_tokens, limits.episode_tokens), temperature, n=n, seed=seed)
    _check_versions(engine, version, [c for group in groups for c in group])
    for episode, completion in zip(episodes, [c for group in groups for c in group]):
        episode.add(completion, version)
    steps = Steps(make_env, limits)
    steps.after_turn(episodes)
    turn = 1
    while steps.busy:
        ready = [e for e in steps.collect() if _answer(e, tokenizer, limits)]
        if not ready:
            continue
        version = engine.weight_version
        room = [min(limits.max_tokens, limits.episode_tokens - len(e.token_ids)) for e in ready]
        completions: dict[int, Completion] = {}
        for budget in sorted(set(room)):  # one call per distinct budget (usually one)
            index = [i for i, r in enumerate(room) if r == budget]
            out = engine.generate(
                [ready[i].prompt + ready[i].token_ids for i in index], budget, temperature,
                n=1, seed=None if seed is None else seed + 1_000_003 * turn,
            )
            _check_versions(engine, version, [group[0] for group in out])
            completions.update({i: group[0] for i, group in zip(index, out)})
        for i, episode in enumerate(ready):
            episode.add(completions[i], version)
        turn += 1
        steps.after_turn(ready)
    return episodes


def _check_versions(engine: Generator, version: int, completions: Sequence[Completion]) -> None:
    """A turn the engine reports no per-token versions for is stamped with the version served
    when it began (`Episode.add`); a sync during the turn would mislabel its tokens: an error,
    as in single-turn `rollout.generate` (whose check the episode stamps would otherwise pass)."""
    if engine.weight_version != version and any(len(c.versions) != len(c.token_ids) for c in completions):
        raise RuntimeError(
            f"the engine's weights changed from version {version} to {engine.weight_version} while "
            f"it generated a turn, and {type(engine).__name__} reports no per-token versions: syncs "
            "must hold the trainer's engine lock (or use servers with rollout.in_flight: keep)"
        )


class Steps:
    """The environments' steps, each in a daemon thread of its own, at most `limits.env_workers`
    running at once, each bounded by `limits.env_timeout`. A step past its timeout fails its
    episode and is left behind: its thread cannot be stopped, but as a daemon it holds neither
    the run nor the process's exit (a pool's threads would hold the exit)."""

    def __init__(self, make_env: EnvironmentFactory, limits: Limits) -> None:
        self.make_env, self.limits = make_env, limits
        self.queued: list[Episode] = []
        self.running: dict[Future, tuple[Episode, float]] = {}

    @property
    def busy(self) -> bool:
        return bool(self.queued or self.running)

    def after_turn(self, episodes: list[Episode]) -> None:
        """End the episodes that reached a limit; queue the others' latest turn for their
        environments."""
        for episode in episodes:
            if len(episode.token_ids) >= self.limits.episode_tokens:
                episode.end = "episode_tokens"
            elif len(episode.turns) >= self.limits.max_turns:
                episode.end = "max_turns"
            else:
                self.queued.append(episode)
        self._start()

    def collect(self) -> list[Episode]:
        """Wait until a step answers or one's deadline passes, then up to GATHER seconds for
        the rest; the episodes whose environments answered with a message (`Episode.reply`).
        Those that ended or failed are closed."""
        if self.running:
            deadline = min(due for _, due in self.running.values())
            wait(list(self.running), timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            wait(list(self.running), timeout=GATHER)
        ready, now = [], time.monotonic()
        for future, (episode, due) in list(self.running.items()):
            if not future.done():
                if now >= due:
                    del self.running[future]
                    episode.fail(f"environment step timed out after {self.limits.env_timeout:g} s")
                continue
            del self.running[future]
            reply = _reply(future, episode)
            if reply is None:
                continue
            if reply.done:
                episode.end, episode.reward = "environment", reply.reward
                continue
            episode.reply = reply
            ready.append(episode)
        self._start()
        return ready

    def _start(self) -> None:
        while self.queued and len(self.running) < self.limits.env_workers:
            episode = self.queued.pop(0)
            future: Future = Future()
            thread = threading.Thread(
                target=self._run, args=(future, episode, episode.turns[-1]), daemon=True, name="environment-step"
            )
            self.running[future] = (episode, time.monotonic() + self.limits.env_timeout)
            thread.start()

    def _run(self, future: Future, episode: Episode, text: str) -> None:
        """One step: the environment's answer to `text` (built on the episode's first step)."""
        try:
            if episode.env is None:
                episode.env = self.make_env(episode.row)
            future.set_result(episode.env.step(text))
        except BaseException as err:  # the environment's own failure: its episode ends, not the run
            future.set_exception(err)


def _answer(episode: Episode, tokenizer, limits: Limits) -> bool:
    """Append the environment's message as tokens; False (episode ended) when it would leave
    no room for the policy to read it and go on."""
    reply, episode.reply = episode.reply, None
    ids = encode_reply(tokenizer, reply.role, reply.text, closed=_closed(episode, tokenizer))
    if len(episode.token_ids) + len(ids) >= limits.episode_tokens:
        episode.end = "episode_tokens"
        return False
    episode.answer(ids)
    return True


def _reply(future: Future, episode: Episode) -> Reply | None:
    """The step's `Reply`, or None with the episode failed and the reason logged."""
    error = future.exception()
    if error is not None:
        episode.fail(f"environment raised {type(error).__name__}: {error}")
        return None
    reply = future.result()
    if not isinstance(reply, Reply):
        episode.fail(f"environment answered {reply!r:.80}, not a lorasync Reply (Reply.say or Reply.end)")
        return None
    return reply


def _closed(episode: Episode, tokenizer) -> bool:
    """Whether the policy's last turn ended with the tokenizer's end token (sampled, so the
    reply's tokens start after it)."""
    return not episode.truncated and bool(episode.token_ids) and episode.token_ids[-1] == tokenizer.eos_token_id
