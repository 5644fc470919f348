"""The arithmetic task: seeded problems, disjoint splits, the answer parser (one case per edge),
the rewards (with the `truncated` column) and prompt rendering. No engine, no real model."""

import pytest

from lorasync.tasks import arith


def problem(row: dict) -> tuple[str, int, int]:
    """(op, a, b) of a row, read back from its question."""
    _, _, a, op, b = row["prompt"][0]["content"].split("?")[0].split(" ")
    return op, int(a), int(b)


def test_rows_are_chat_prompts_with_right_answers_and_levels_taking_turns():
    rows = arith.rows("train", 300, seed=3)
    assert all(row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1 for row in rows)
    for row in rows:
        op, a, b = problem(row)
        assert row["answer"] == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert (arith.LEVELS[row["level"]].op, row["answer"] >= 0) == (op, True)
    counts = {level: sum(row["level"] == level for row in rows) for level in arith.DEFAULT_LEVELS}
    assert set(counts.values()) == {100}


def test_rows_are_reproducible_from_the_seed():
    assert arith.rows("test", 50, seed=1) == arith.rows("test", 50, seed=1)
    assert arith.rows("test", 50, seed=1) != arith.rows("test", 50, seed=2)
    assert arith.rows("train", 50, seed=1, levels=["mul"])[0]["level"] == "mul"


def test_splits_are_disjoint_by_construction_commutative_problems_included():
    def canonical(row):
        op, a, b = problem(row)
        return (op, *sorted((a, b))) if op in "+*" else (op, a, b)

    train = {canonical(r) for r in arith.rows("train", 6000, seed=0)}
    test = {canonical(r) for r in arith.rows("test", 3000, seed=0)}
    assert train and test and not train & test
    # a level smaller than asked repeats its problems (mul's test split holds 52) instead of leaking
    assert len({problem(r) for r in arith.rows("test", 400, levels=["mul"])}) == 52
    assert arith.split_of("+", 17, 25) == arith.split_of("+", 25, 17)
    share = sum(arith.split_of("+", a, b) == "test" for a in range(10, 100) for b in range(a, 100)) / 4095
    assert abs(share - arith.TEST_FRACTION) < 0.03


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", 42),  # a bare number
        ("-7", -7),  # negative
        ("1,234", 1234),  # thousands separator
        ("The answer is 42.", 42),  # a sentence with a trailing period
        ("42.", 42),  # trailing period
        ("42.0", 42),  # a whole decimal
        ("3.5", None),  # not a whole number
        ("I don't know", None),  # no number at all
        ("", None),  # empty
        ("17 + 25 = 42", 42),  # the last number wins
        ("It is 40, no: 41", 41),  # the last number wins, after a comma and space
        ("x = -7", -7),  # a minus after a sign is negative
        ("99-57", 57),  # a minus right after a digit is subtraction
        ("42<|im_end|>", 42),  # special text after it
    ],
)
def test_parse_answer(text, expected):
    assert arith.parse_answer(text) == expected


def test_correct_scores_the_last_number_and_zeroes_truncated_completions():
    completions = ["42", "The answer is 42.", "41", "17 + 25 = 42", "42"]
    answers = [42] * 5
    assert arith.correct([], completions, answer=answers, level=["add2"] * 5) == [1, 1, 0, 1, 1]
    cut = [False, False, False, False, True]
    assert arith.correct([], completions, answer=answers, truncated=cut) == [1, 1, 0, 1, 0]
    conversational = [[{"role": "assistant", "content": "42"}]]  # TRL's conversational completions
    assert arith.correct([], conversational, answer=[42]) == [1.0]
    with pytest.raises(ValueError):  # one answer per completion
        arith.correct([], completions, answer=[42])


def test_number_only_rewards_a_bare_answer():
    texts = ["42", " -7.", "The answer is 1,234.", "42 apples", "17 + 25 = 42", ""]
    assert arith.number_only([], texts) == [1, 1, 1, 0, 0, 0]


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="split must be one of train, test"):
        arith.rows("valid", 3)
    with pytest.raises(ValueError, match="levels must be some of add1, add2"):
        arith.rows("test", 3, levels=["div"])
