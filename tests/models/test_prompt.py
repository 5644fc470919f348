"""`models/prompt.encode_prompt`: text as it is, conversations through the chat template."""

from __future__ import annotations

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
