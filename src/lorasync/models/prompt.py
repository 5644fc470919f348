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


_MARK = "\x00lorasync-turn\x00"  # a stand-in assistant turn, found again in the rendered text


def encode_reply(tokenizer, role: str, content: str, closed: bool) -> list[int]:
    """Token ids that follow a policy turn, as the chat template would render the rest of the
    conversation: the close of the assistant's turn (less its end token when the policy
    sampled it: `closed`), a `role` message holding `content`, and the opening of the
    assistant's next turn. The policy's own tokens are never re-encoded: they stay the ids the
    engine sampled, which its logprobs belong to.

    The template is rendered on a stand-in conversation, with and without the message; its
    rendering must only append (ChatML and most templates do), else ValueError. A tokenizer
    without a template gets the content as plain text on a line of its own, as
    `encode_prompt` writes messages."""
    if not tokenizer.chat_template:
        return tokenizer(f"\n{content}\n", add_special_tokens=False).input_ids
    stand_in = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
    before = tokenizer.apply_chat_template(stand_in, tokenize=False)
    after = tokenizer.apply_chat_template(
        stand_in + [{"role": role, "content": content}], add_generation_prompt=True, tokenize=False
    )
    if not after.startswith(before):
        raise ValueError(
            "this chat template rewrites earlier turns when a message is added, so a reply "
            "cannot be appended to the policy's tokens; use a template that only appends (ChatML)"
        )
    closing = before[before.rindex(_MARK) + len(_MARK):]
    end = tokenizer.eos_token or ""
    if closed and end and closing.startswith(end):
        closing = closing[len(end):]
    return tokenizer(closing + after[len(before):], add_special_tokens=False).input_ids
