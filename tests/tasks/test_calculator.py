"""`tasks/calculator.py`: the calculator's arithmetic, its environment, and its rows."""

from __future__ import annotations

import pytest

from lorasync.tasks import arith, calculator
from lorasync.tasks.calculator import INSTRUCTIONS, Calculator, calculate


@pytest.mark.parametrize(
    "expression, result",
    [("17 * 25", "425"), (" (3 + 4) * -2 ", "-14"), ("7 / 2", "3.5"), ("8 / 2", "4"), ("1 / 3", "0.333333")],
)
def test_calculate_evaluates_arithmetic(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "expression, error",
    [("__import__('os')", "only numbers"), ("2 ** 3", "only numbers"), ("1 / 0", "division by zero"),
     ("17 *", "error"), ("9" * 20 + " * " + "9" * 20, "result too large"), ("'a' * 3", "only numbers")],
)
def test_calculate_answers_anything_else_with_an_error_the_policy_reads(expression, error):
    assert calculate(expression).startswith("error") and error in calculate(expression)


def test_the_environment_answers_a_call_and_ends_on_an_answer():
    env = Calculator({"answer": 425})
    reply = env.step("Let me compute <calc>17*25</calc>")
    assert (reply.text, reply.role, reply.done) == ("425", "tool", False)
    assert env.step("The answer is 425.").done
    assert env.calls == 1


def test_rows_are_arith_rows_with_the_tools_instructions():
    plain, tools = arith.rows("test", 6, seed=3), calculator.rows("test", 6, seed=3)
    assert [r["answer"] for r in plain] == [r["answer"] for r in tools]
    for p, t in zip(plain, tools):
        assert t["prompt"][-1]["content"] == f"{p['prompt'][0]['content']} {INSTRUCTIONS}"
        assert t["prompt"][:-1] == calculator.demonstration()


def test_the_demonstration_calls_the_tool_and_answers_with_its_result():
    messages = calculator.demonstration()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"] * len(calculator.DEMONSTRATION)
    for question, call, result, answer in zip(*[iter(messages)] * 4):
        expression = calculator.CALL.fullmatch(call["content"]).group(1)
        assert result["content"] == answer["content"] == calculate(expression)
        assert arith.correct([question], [[answer]], answer=[int(result["content"])]) == [1.0]


def test_no_demonstrated_question_is_an_arith_problem():
    """The demonstration must not hand the policy a test answer."""
    for a, op, b in calculator.DEMONSTRATION:
        for level in arith.LEVELS.values():
            assert level.op != op or (a, b) not in level.problems()
