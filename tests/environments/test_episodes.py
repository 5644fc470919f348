"""`environments/episodes.py`: a batch of multi-turn episodes against an engine.

Fast tests on a scripted engine (`TurnEngine`): who wrote which token, the engine batching the
turns of all episodes, each limit, each way an environment fails, a slow environment not
holding the others, and versions across a weight change between turns. The `vllm` test plays
episodes on a real engine: the engine's logprobs of every policy token of every turn equal the
trainer's within 1e-4 (float32), each token judged by the policy of its own version, with a
sync between two turns."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from lorasync.environments.episodes import Limits, run_episodes
from lorasync.environments.protocol import Reply
from lorasync.models.prompt import encode_reply
from lorasync.sync.base import Completion

TURN = 4  # tokens of a scripted policy turn, its end token included


class TurnEngine:
    """Each turn: TURN - 1 tokens then the end token (cut off at `max_tokens`, truncated),
    logprob -0.5 each; records each call's prompt lengths and `n`."""

    def __init__(self, eos: int) -> None:
        self.eos, self.weight_version, self.calls = eos, 0, []

    def generate(self, prompts, max_tokens, temperature=1.0, n=1, seed=None):
        self.calls.append(([len(p) for p in prompts], n))
        out = []
        for p in prompts:
            ids = ([7] * (TURN - 1) + [self.eos])[:max_tokens]
            completion = Completion(ids, f"turn at {len(p)}", [-0.5] * len(ids), truncated=max_tokens < TURN)
            out.append([completion] * n)
        return out


class Scripted:
    """Answers `replies` times (row), then ends with reward 1; or misbehaves as the row says."""

    def __init__(self, row: dict) -> None:
        self.row, self.steps = row, 0

    def step(self, text: str) -> Reply:
        self.steps += 1
        kind = self.row.get("kind")
        if kind == "raise":
            raise ValueError("boom")
        if kind == "hang":
            self.row["release"].wait(30)
        if kind == "malformed":
            return "42"  # type: ignore[return-value]
        if kind == "not text":
            return Reply.say(42)  # type: ignore[arg-type]
        if kind == "slow":
            time.sleep(0.5)
        if kind == "bump":  # a sync landed while the environment worked
            self.row["engine"].weight_version = 1
        return Reply.say(f"reply {self.steps}") if self.steps <= self.row.get("replies", 1) else Reply.end(1.0)


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model("qwen2"))


def play(tokenizer, rows, n=1, **limits):
    engine = TurnEngine(tokenizer.eos_token_id)
    for row in rows:
        row.setdefault("engine", engine)
    episodes = run_episodes(engine, tokenizer, [[1, 2, 3]] * len(rows), rows, Scripted,
                            Limits(**{"max_tokens": TURN, **limits}), 1.0, n=n, seed=0)
    return engine, episodes


def test_the_mask_covers_exactly_the_policys_tokens_and_replies_are_the_templates(tokenizer):
    _, (episode,) = play(tokenizer, [{"replies": 2}])
    turn = [7] * (TURN - 1) + [tokenizer.eos_token_id]
    reply = [encode_reply(tokenizer, "tool", f"reply {k}", closed=True) for k in (1, 2)]
    assert episode.token_ids == turn + reply[0] + turn + reply[1] + turn
    assert episode.policy == [True] * TURN + [False] * len(reply[0]) + [True] * TURN + [False] * len(reply[1]) + [True] * TURN
    assert episode.logprobs == [-0.5 if p else 0.0 for p in episode.policy]
    assert (episode.end, episode.reward, episode.replies, len(episode.turns)) == ("environment", 1.0, 2, 3)
    completion = episode.completion()
    assert completion.token_ids == episode.token_ids and completion.text == episode.turns[-1]


def test_the_engine_batches_each_round_of_turns_across_episodes(tokenizer):
    engine, episodes = play(tokenizer, [{"replies": 2} for _ in range(3)], n=2)
    assert len(episodes) == 6
    # the first turns as one group call (n = 2 per prompt), then one call per round for all six
    assert [(len(lengths), n) for lengths, n in engine.calls] == [(3, 2), (6, 1), (6, 1)]


@pytest.mark.parametrize(
    "limits, end, turns",
    [({"max_turns": 2}, "max_turns", 2), ({"episode_tokens": "two turns"}, "episode_tokens", 2), ({"episode_tokens": "no room"}, "episode_tokens", 1)],
)
def test_each_limit_ends_an_episode(tokenizer, limits, end, turns):
    reply = len(encode_reply(tokenizer, "tool", "reply 1", closed=True))
    # two whole turns and a reply; or a turn and a reply, which leave the policy no room
    budgets = {"two turns": 2 * TURN + reply, "no room": TURN + reply}
    limits = {k: budgets.get(v, v) for k, v in limits.items()}
    _, (episode,) = play(tokenizer, [{"replies": 9}], **limits)
    assert (episode.end, len(episode.turns), episode.failed) == (end, turns, False)
    assert len(episode.token_ids) <= limits.get("episode_tokens", 10**9)
    assert episode.policy[-1], "an episode never ends on the environment's tokens"


def test_a_turn_cut_off_goes_on_its_reply_closing_it(tokenizer):
    _, (episode,) = play(tokenizer, [{"replies": 1}], max_tokens=TURN - 1)
    cut = [7] * (TURN - 1)
    reply = encode_reply(tokenizer, "tool", "reply 1", closed=False)
    assert episode.token_ids == cut + reply + cut
    assert (episode.end, episode.truncated, len(episode.turns)) == ("environment", True, 2)


@pytest.mark.parametrize(
    "kind, reason",
    [("raise", "environment raised ValueError: boom"), ("hang", "environment step timed out after 0.3 s"),
     ("malformed", "environment answered '42', not a lorasync Reply"),
     ("not text", "environment raised TypeError: Reply.text = 42: give a string")],
)
def test_a_failing_environment_ends_its_episode_with_the_reason_logged_and_the_batch_goes_on(
    tokenizer, caplog, kind, reason
):
    release = threading.Event()
    rows = [{"kind": kind, "release": release}, {"replies": 2}]
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING, logger="lorasync.environments.episodes"):
            _, (bad, good) = play(tokenizer, rows, env_timeout=0.3)
    finally:
        release.set()
    assert time.perf_counter() - start < 5
    assert bad.failed and reason in bad.error and reason in caplog.text
    assert (good.end, good.replies) == ("environment", 2)


def test_a_slow_environment_does_not_hold_the_others(tokenizer):
    engine, (slow, fast) = play(tokenizer, [{"kind": "slow", "replies": 1}, {"replies": 2}])
    assert slow.end == fast.end == "environment" and fast.replies == 2
    # the fast episode's later turns ran without the slow one: rounds of one
    assert [len(lengths) for lengths, _ in engine.calls][:3] == [2, 1, 1]


def test_a_weight_change_between_turns_shows_in_the_versions(tokenizer):
    _, (episode,) = play(tokenizer, [{"kind": "bump", "replies": 1}])
    first = [0] * TURN
    assert episode.versions[:TURN] == first and episode.versions[-TURN:] == [1] * TURN


def test_a_sync_during_a_turn_of_an_engine_without_token_versions_is_an_error(tokenizer):
    """Its tokens would be stamped with the version served when the turn began."""

    class Syncing(TurnEngine):
        def generate(self, prompts, max_tokens, temperature=1.0, n=1, seed=None):
            out = super().generate(prompts, max_tokens, temperature, n, seed)
            self.weight_version += 1  # a sync landed while it generated
            return out

    engine = Syncing(tokenizer.eos_token_id)
    with pytest.raises(RuntimeError, match="changed from version 0 to 1 while it generated a turn"):
        run_episodes(engine, tokenizer, [[1, 2, 3]], [{}], Scripted, Limits(max_tokens=TURN), 1.0)


def test_limits_name_the_bad_value():
    with pytest.raises(ValueError, match="max_turns = 0: must be >= 1"):
        Limits(max_turns=0)
    with pytest.raises(ValueError, match="env_timeout = 0: must be > 0"):
        Limits(env_timeout=0)


@pytest.mark.vllm
@pytest.mark.parametrize("kind", ["colocated", "server"])
def test_engine_logprobs_equal_the_trainers_on_every_policy_token_of_every_turn(tiny_model, engine_for, request, kind):
    """Two prompts x two episodes, two replies each, a sync landing while the environments
    answer the first turn: the turns before it were sampled at version v, those after at v+1,
    and each token's engine logprob matches the policy of its own version within 1e-4. On the
    colocated engine (streaming sync) the runner stamps each turn's version; on a server with
    `in_flight: keep` (factors sync) the server labels each token itself."""
    from lorasync.sync.weight_sync import WeightSync
    from lorasync.train.rollout import completion_logprobs
    from tests.helpers import TOKEN, policy, train_step

    model_dir = tiny_model("qwen2")
    if kind == "colocated":
        engine, strategy = engine_for(model_dir), "streaming"
    else:
        from lorasync.server.client.engine import ServerEngine

        engine, strategy = ServerEngine(request.getfixturevalue("qwen2_server").url, TOKEN, in_flight="keep"), "factors"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = policy(model_dir, seed=3)
    model.eval()
    sync = WeightSync(model, engine, strategy)
    sync()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = engine.weight_version
    lock, synced = threading.Lock(), []

    class SyncOnce(Scripted):
        def step(self, text):
            with lock:  # the first step syncs; the others wait for it
                if not synced:
                    train_step(model, scale=0.05)
                    synced.append(sync())
            return super().step(text)

    prompts = [[5, 9, 14, 3, 8], [11, 4, 6]]
    rows = [{"replies": 2}, {"replies": 2}]
    episodes = run_episodes(engine, tokenizer, prompts, rows, SyncOnce, Limits(max_tokens=6), 1.0, n=2, seed=1)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    assert synced and all(e.replies == 2 for e in episodes)
    checked = 0
    for version, state in ((start, before), (start + 1, after)):
        model.load_state_dict(state)
        with torch.no_grad():
            trainer, _ = completion_logprobs(
                model, [e.prompt for e in episodes], [e.token_ids for e in episodes], tokenizer.pad_token_id
            )
        for i, e in enumerate(episodes):
            for t, (own, lp, v) in enumerate(zip(e.policy, e.logprobs, e.versions)):
                if own and v == version:
                    assert abs(trainer[i, t].item() - lp) <= 1e-4, (i, t, version)
                    checked += 1
    assert checked == sum(sum(e.policy) for e in episodes)
    assert {v for e in episodes for v in e.versions} == {start, start + 1}
    if kind == "server":
        engine.close()
