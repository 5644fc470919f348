"""`environments/protocol.py`: what a `Reply` may hold, and loading an environment by name."""

from __future__ import annotations

import pytest

from lorasync.environments.protocol import Environment, Reply, load_environment
from lorasync.tasks.calculator import Calculator


def test_a_reply_goes_on_with_text_or_ends_with_an_optional_reward():
    assert not Reply.say("42").done and Reply.say("42").role == "tool"
    assert Reply.say("hi", role="user").role == "user"
    assert Reply.end().done and Reply.end().reward is None
    assert Reply.end(1).reward == 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Reply(text=42), "Reply.text = 42: give a string"),
        (lambda: Reply.say("x", role="assistant"), "Reply.role = 'assistant': use one of tool, user, system"),
        (lambda: Reply(text="x", reward=1.0), "give text .go on. or reward .end., not both"),
    ],
)
def test_a_malformed_reply_names_the_rule(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_environments_load_by_name_and_bad_names_say_what_is_wrong():
    assert load_environment("lorasync.tasks.calculator:Calculator") is Calculator
    assert isinstance(Calculator({}), Environment)
    with pytest.raises(ValueError, match="write it as 'package.module:Class'"):
        load_environment("lorasync.tasks.calculator")
    with pytest.raises(ValueError, match="cannot import module 'nowhere'"):
        load_environment("nowhere:Env")
    with pytest.raises(ValueError, match="has no class 'correct' with a step"):
        load_environment("lorasync.tasks.arith:correct")
