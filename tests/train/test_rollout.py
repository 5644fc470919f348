"""`completion_logprobs`: each completion token's logprob given its prompt and the tokens
before it, batched with padding and computing logits only where completions are predicted."""

import zlib

import torch
from transformers import AutoModelForCausalLM

from lorasync.train.rollout import completion_logprobs


def reference(model, prompt, completion):
    """One sequence alone, unpadded, every position's logits."""
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return [logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)]


def test_batched_logprobs_equal_each_sequence_alone(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2")).eval()
    # prompts of different lengths, completions of different lengths (one empty)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 17, 18], [15, 16]]
    completions = [[20, 21, 22, 23], [24], [25, 26], []]
    with torch.no_grad():
        out, mask = completion_logprobs(model, prompts, completions, pad_id=0)
        assert out.shape == mask.shape == (4, 4)
        assert mask.sum(1).tolist() == [4, 1, 2, 0]
        for i, (p, c) in enumerate(zip(prompts, completions)):
            torch.testing.assert_close(out[i, : len(c)], torch.tensor(reference(model, p, c)), atol=1e-5, rtol=0)
        assert out[~mask].abs().sum() == 0


def test_prompts_that_leave_the_engine_no_room_are_refused(tmp_path):
    """A prompt plus `rollout.max_tokens` (single-turn) or `rollout.episode_tokens` (episodes)
    over the engine's `max_model_len` is a ConfigError naming both and the fix; an exact fit
    passes, and an engine that does not say its limit is not checked."""
    from types import SimpleNamespace

    import pytest

    from lorasync.train.config import ConfigError
    from lorasync.train.rollout import check_room
    from tests.helpers import demo_trainer_config

    single = demo_trainer_config("base", tmp_path, rollout={"max_tokens": 12})
    episodes = demo_trainer_config("base", tmp_path, rollout={
        "environment": "tests.train.test_rollout:Flaky", "max_tokens": 6, "episode_tokens": 30})
    prompts = [[1] * 5, [1] * 8]
    check_room(SimpleNamespace(max_model_len=20), single, prompts)  # 8 + 12: a fit
    with pytest.raises(ConfigError, match=r"a prompt of 8 tokens and rollout.max_tokens = 12 need 20 "
                       r"tokens, over the engine's max_model_len = 19: set engine.max_model_len=20"):
        check_room(SimpleNamespace(max_model_len=19), single, prompts)
    with pytest.raises(ConfigError, match=r"rollout.episode_tokens = 30 need 38 tokens, over the "
                       r"engine's max_model_len = 20: .*or lower rollout.episode_tokens"):
        check_room(SimpleNamespace(max_model_len=20), episodes, prompts)
    check_room(SimpleNamespace(), episodes, prompts)  # an engine that does not say its limit


def test_episodes_score_only_the_policys_tokens_and_failed_ones_get_reward_0(tiny_model, tmp_path, caplog):
    """A batch of multi-turn episodes (`rollout.environment`): the rollout's mask is the
    policy's tokens alone (the loss, the health check and the versions use it), the
    environment's reward is added, a failed episode scores 0, and a step trains on it."""
    from lorasync.train.rollout import score
    from lorasync.train.trainer import GRPOTrainer
    from tests.helpers import ReplayEngine, demo_trainer_config

    model_dir = tiny_model("qwen2")
    config = demo_trainer_config(
        model_dir, tmp_path, steps=1,
        rollout={"environment": "tests.train.test_rollout:Flaky", "max_turns": 3, "max_tokens": 6},
    )
    trainer = GRPOTrainer(config, ReplayEngine(model_dir))
    generated = trainer._generate(0)
    episodes = generated.episodes
    assert episodes and len(generated.samples) == len(episodes)
    batch = score(generated, trainer.model, trainer.tokenizer, config, trainer.rewards)
    for i, episode in enumerate(episodes):
        assert batch.mask[i].tolist() == episode.policy + [False] * (batch.mask.shape[1] - len(episode.policy))
    assert any(not all(e.policy) for e in episodes), "some episodes hold the environment's tokens"
    failed = torch.tensor([e.failed for e in episodes])
    assert failed.any() and (batch.rewards[failed] == 0).all()
    assert batch.reward_stats["episode/failed_fraction"] == failed.float().mean().item()
    rows = trainer.train(progress=False)
    assert rows[0]["episode/turns_mean"] > 1 and rows[0]["optimizer_steps"] == 1


class Flaky:
    """Answers once with a tool message, then ends with reward 0.5; raises in every third
    episode (by its row's prompt)."""

    def __init__(self, row: dict) -> None:
        self.steps = 0
        self.fails = zlib.crc32(str(row).encode()) % 3 == 0

    def step(self, text: str):
        from lorasync.environments.protocol import Reply

        self.steps += 1
        if self.fails:
            raise RuntimeError("tool crashed")
        return Reply.say("result: 7") if self.steps == 1 else Reply.end(0.5)
