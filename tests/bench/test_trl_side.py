"""`bench trl`'s TRL side (`bench/trl_side.py`): TRL's GRPOConfig takes one optimizer step per
generation batch of lorasync's shape, and its rewards score cut-off completions as lorasync's
do. The whole bench, both sides on vLLM: tests/bench/test_trl.py."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lorasync.bench.trl import TrlBenchConfig, train_config
from lorasync.bench.trl_side import trl_args, trl_rewards


@pytest.fixture
def model_dir(tmp_path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_trl_takes_one_optimizer_step_per_generation_batch_of_the_same_shape(model_dir):
    config = TrlBenchConfig(model=model_dir, prompts_per_step=4, num_generations=6, grad_accum=3)
    args = trl_args(config)
    # TRL 1.16: one generation batch of all the step's completions, one optimizer step over it
    assert args.generation_batch_size == config.completions == 24
    assert args.steps_per_generation == args.gradient_accumulation_steps == 3
    assert args.generation_batch_size // args.num_generations == config.prompts_per_step
    assert (args.max_steps, args.learning_rate, args.beta, args.max_completion_length) == (10, 3e-4, 0.0, 16)
    train = train_config(config)
    assert train.optim.grad_accum == 3 and train.lora.alpha == 2 * train.lora.rank
    assert not args.shuffle_dataset and not args.gradient_checkpointing and not args.bf16


def test_trl_rewards_score_cut_off_completions_as_lorasync_does(tiny_model):
    config = TrlBenchConfig(model=tiny_model("qwen2"), max_tokens=3)
    (correct, number_only), weights = trl_rewards(config)
    eos = AutoTokenizer.from_pretrained(config.model).eos_token_id
    ids = [[5, 6, eos], [5, 6, 7], [5, eos]]  # ended at the limit, cut off, ended early
    scores = correct(prompts=[None] * 3, completions=["42"] * 3, completion_ids=ids, answer=[42] * 3,
                     trainer_state=None)
    assert scores == [1.0, 0.0, 1.0] and weights == [1.0, 0.0]
    assert (correct.__name__, number_only.__name__) == ("correct", "number_only")
