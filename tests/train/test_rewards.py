"""Reward functions (train/rewards.py): `load_reward` imports `module:function` and refuses, naming
the path, a module that does not import and a name that is no function; the demo's
`digit_fraction` scores the share of a completion's non-space characters that are digits. No
model, no engine."""

import pytest

from lorasync.train.rewards import digit_fraction, load_reward


def test_a_reward_loads_by_path_and_what_is_missing_is_named():
    assert load_reward("lorasync.train.rewards:digit_fraction") is digit_fraction
    with pytest.raises(ValueError, match=r"reward 'lorasync.nope:f': cannot import module 'lorasync.nope'"):
        load_reward("lorasync.nope:f")
    for module, attr in [("lorasync.train.rewards", "nope"), ("math", "pi")]:  # absent; not callable
        with pytest.raises(ValueError, match=f"reward '{module}:{attr}': module '{module}' has no function '{attr}'"):
            load_reward(f"{module}:{attr}")


def test_digit_fraction_counts_digits_among_the_non_space_characters():
    completions = ["12ab", " 1 2 ", "x", "", "  \n"]
    assert digit_fraction(["prompt"] * len(completions), completions, answer=["7"] * 5) == [0.5, 1.0, 0.0, 0.0, 0.0]
