"""The colocated engine (`engines/colocated.py`): its KV cache is sized to the batch it will
generate (no engine needed); and on a real vLLM, seeded sampling on a batch too big for one
scheduler step generates reproducibly, built with `vllm_compat.scheduler_args`.

vLLM on CPU crashed such a batch with "CPU Generator does not use offset": with chunked
prefill, the prompt that overflows a step's token budget is prefilled in part, and the
runner then rewinds that seeded request's generator, which a CPU generator cannot do.
"""

from __future__ import annotations

import pytest

from lorasync.engines.colocated import KV_BLOCK_TOKENS, MAX_KV_CACHE_BYTES, EngineConfig
from lorasync.served_model import kv_bytes_per_token
from lorasync.sync.base import prompt_seed
from lorasync.sync.verify import probe_sequences


def test_the_kv_cache_holds_the_batch_within_one_sequence_and_the_cap(tiny_model):
    model = tiny_model("llama")
    per_token = kv_bytes_per_token(model, "float32")
    one = 2 * KV_BLOCK_TOKENS * per_token  # 200 tokens: two blocks
    assert EngineConfig(model, max_model_len=200, batch_sequences=6).kv_cache_bytes == 6 * one
    assert EngineConfig(model, max_model_len=200, batch_sequences=1).kv_cache_bytes == one
    assert EngineConfig(model, max_model_len=200).kv_cache_bytes == MAX_KV_CACHE_BYTES  # no batch given
    huge = EngineConfig(model, max_model_len=200, batch_sequences=10**7)
    assert huge.kv_cache_bytes == MAX_KV_CACHE_BYTES
    assert EngineConfig(model, kv_cache_bytes=12345, batch_sequences=6).kv_cache_bytes == 12345  # as given
    with pytest.raises(ValueError, match="batch_sequences must be >= 1, got 0"):
        EngineConfig(model, batch_sequences=0)


@pytest.mark.vllm
def test_seeded_batch_larger_than_one_step_generates_reproducibly(tiny_model, engine_for):
    engine = engine_for(tiny_model("llama"))
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    length = 100
    # More prompt tokens than one step takes (4096 on CPU): before the fix, some prompt was
    # always split across steps, and the first such step crashed.
    prompts = probe_sequences(engine.vocab_size, n=budget // length + 8, length=length, seed=4)
    assert len(prompts) * length > budget

    first = engine.generate(prompts, max_tokens=4, temperature=1.0, n=2, seed=7)
    assert [len(cs) for cs in first] == [2] * len(prompts)
    assert all(1 <= len(c.token_ids) == len(c.logprobs) <= 4 for cs in first for c in cs)  # EOS may stop one

    # Same seed, same tokens (the second call also meets the prompts in the prefix cache).
    again = engine.generate(prompts, max_tokens=4, temperature=1.0, n=2, seed=7)
    assert tokens(again) == tokens(first)
    # ... and the seed matters.
    other = engine.generate(prompts, max_tokens=4, temperature=1.0, n=2, seed=8)
    assert tokens(other) != tokens(first)


@pytest.mark.vllm
def test_prompts_of_one_call_draw_apart(tiny_model, engine_for):
    """The same prompt twice in one seeded call gets different samples (`base.prompt_seed`):
    with one seed for every prompt, both copies drew the same random numbers, token for token."""
    engine = engine_for(tiny_model("llama"))
    prompt = probe_sequences(engine.vocab_size, n=1, length=8, seed=5)[0]
    first, second = engine.generate([prompt, prompt], max_tokens=8, temperature=1.0, n=2, seed=3)
    assert tokens([first]) != tokens([second])
    # ... and prompt i of a call is sampled as prompt 0 of a call seeded prompt_seed(seed, i, n)
    (alone,) = engine.generate([prompt], max_tokens=8, temperature=1.0, n=2, seed=prompt_seed(3, 1, 2))
    assert tokens([alone]) == tokens([second])


def tokens(out) -> list[list[list[int]]]:
    return [[c.token_ids for c in completions] for completions in out]


@pytest.mark.vllm
def test_a_sequence_reaching_max_model_len_is_cut_as_if_at_max_tokens(tiny_model, engine_for):
    """Why the trainer checks its prompts against the engine's `max_model_len` up front
    (`train/rollout.check_room`): vLLM takes a prompt with less room than `max_tokens` left and
    stops its completion at `max_model_len`, marked like one cut at `max_tokens`, no error."""
    engine = engine_for(tiny_model("llama"))
    room = engine.max_model_len
    assert room == engine.llm.llm_engine.model_config.max_model_len
    prompt = probe_sequences(engine.vocab_size, n=1, length=room - 3, seed=6)[0]
    (completion,) = engine.generate([prompt], max_tokens=16, temperature=0.0)[0]
    assert len(completion.token_ids) == 3 and completion.truncated
