"""`models/prompt.encode_prompt`: text as it is, conversations through the chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lorasync.models.prompt import encode_prompt
from lorasync.tasks import arith


def test_prompts_are_text_or_conversations_through_the_chat_template(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    assert encode_prompt(tokenizer, "hello") == tokenizer("hello").input_ids
    messages = arith.rows("test", 1)[0]["prompt"]
    plain = encode_prompt(tokenizer, messages)  # tiny tokenizers have no template
    assert tokenizer.decode(plain) == messages[0]["content"] + "\n"
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert tokenizer.decode(encode_prompt(tokenizer, messages)) == (
        f"<user>{messages[0]['content']}<assistant>"
    )


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_reply_is_the_template_after_the_policys_own_tokens(tiny_model):
    """An environment's message after a policy turn: the policy's sampled ids, then
    `encode_reply`, read as the template renders the whole conversation; with the end token
    sampled (closed) or not (a turn cut off: the reply closes it)."""
    from lorasync.models.prompt import encode_reply

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    messages = [{"role": "user", "content": "What is 17 * 25?"}]
    turn = "<calc>17*25</calc>"
    whole = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": turn}, {"role": "tool", "content": "425"}],
        add_generation_prompt=True, tokenize=False,
    )
    sampled = tokenizer(turn, add_special_tokens=False).input_ids
    closed = encode_prompt(tokenizer, messages) + sampled + [tokenizer.eos_token_id]
    assert tokenizer.decode(closed + encode_reply(tokenizer, "tool", "425", closed=True)) == whole
    cut = encode_prompt(tokenizer, messages) + sampled
    assert tokenizer.decode(cut + encode_reply(tokenizer, "tool", "425", closed=False)) == whole


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_model):
    from lorasync.models.prompt import encode_reply

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    # renders only the last message: adding one rewrites what came before
    tokenizer.chat_template = "{{ messages[-1].role }}: {{ messages[-1].content }}"
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        encode_reply(tokenizer, "tool", "425", closed=True)


def test_without_a_template_a_reply_is_its_text_on_a_line(tiny_model):
    from lorasync.models.prompt import encode_reply

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    assert tokenizer.decode(encode_reply(tokenizer, "tool", "425", closed=True)) == "\n425\n"
