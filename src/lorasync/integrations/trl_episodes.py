"""lorasync's multi-turn episodes as a TRL `rollout_func` (TRL 1.16.x, vLLM colocate mode).

TRL 1.16's GRPOTrainer takes `rollout_func(prompts, trainer)`: it gets this process's
prompts (each already repeated `num_generations` times by TRL's sampler) and returns
`prompt_ids`, `completion_ids` and `logprobs`, plus `env_mask` (1 on the model's tokens, the
only ones TRL trains on); other keys reach the reward functions. `episode_rollout(environment)`
returns one that plays each prompt as a lorasync episode (`environments/episodes.py`) on the
trainer's own vLLM engine, so a lorasync environment (`environments/protocol.py`) trains in
TRL unchanged: the policy's sampled ids are kept as they are, the environment's messages are
appended through the chat template, and `env_mask` marks who wrote each token.

A lorasync run cannot take a TRL `rollout_func` the other way: it is written against TRL's
trainer (its `vllm_generation`, its tokenizer, its args); port it as an environment
(docs/environments.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lorasync.engines.colocated import ColocatedEngine
from lorasync.environments.episodes import Limits, run_episodes
from lorasync.environments.protocol import EnvironmentFactory, load_environment
from lorasync.integrations.trl import check_trl_version, served_folder
from lorasync.models.prompt import encode_prompt

if TYPE_CHECKING:
    from transformers import Trainer

RolloutFunc = Callable[[list, "Trainer"], dict[str, Any]]


def episode_rollout(environment: str | EnvironmentFactory, limits: Limits | None = None) -> RolloutFunc:
    """A TRL `rollout_func` playing `environment` (a class, or its 'package.module:Class') in
    episodes bounded by `limits` (default: turns of `max_completion_length` tokens, episodes of
    as many). The environment of a prompt is built from {"prompt": prompt}. Besides TRL's keys,
    the reward functions get `episode_end` (why each episode ended) and `episode_replies` (the
    environment's messages in it)."""
    check_trl_version()
    make_env = load_environment(environment) if isinstance(environment, str) else environment
    engines: dict[int, ColocatedEngine] = {}  # by the id of the trainer's LLM

    def rollout(prompts: list, trainer: Trainer) -> dict[str, Any]:
        args = trainer.args
        if not (args.use_vllm and args.vllm_mode == "colocate"):
            raise ValueError(
                "episode_rollout plays episodes on the trainer's colocated vLLM engine: set "
                f"use_vllm=True, vllm_mode='colocate' (got use_vllm={args.use_vllm}, "
                f"vllm_mode={args.vllm_mode!r})"
            )
        llm = trainer.vllm_generation.llm  # a TRL 1.16 internal, hence the version check
        if id(llm) not in engines:
            engines[id(llm)] = ColocatedEngine.from_llm(llm, served_folder(llm))
        tokenizer = trainer.processing_class
        bounds = limits or Limits(max_tokens=args.max_completion_length, episode_tokens=args.max_completion_length)
        prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
        episodes = run_episodes(
            engines[id(llm)], tokenizer, prompt_ids, [{"prompt": p} for p in prompts], make_env,
            bounds, args.temperature,
        )
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [e.token_ids for e in episodes],
            "logprobs": [e.logprobs for e in episodes],
            "env_mask": [[int(p) for p in e.policy] for e in episodes],
            "episode_end": [e.end for e in episodes],
            "episode_replies": [e.replies for e in episodes],
        }

    return rollout
