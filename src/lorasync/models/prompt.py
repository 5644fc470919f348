"""A prompt as token ids: the one encoding training, evaluation and the benchmarks share, so
an evaluated prompt is the prompt the policy was trained on."""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: text as it is, or a conversation (TRL's conversational format, a
    list of {"role", "content"} messages) through the tokenizer's chat template, ready for the
    assistant's turn. A tokenizer without a template (the tiny test models) gets the
    messages' contents as plain text, one per line."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer("".join(f"{m['content']}\n" for m in prompt), add_special_tokens=False).input_ids
