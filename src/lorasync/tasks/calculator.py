"""Arithmetic with a calculator tool: the `arith` problems, a prompt that offers the tool, and
the environment that runs it (`Calculator`), for multi-turn training (docs/environments.md).

The policy may write a call, `<calc>17 * 25</calc>`, anywhere in its turn; the environment
answers with the result as a `tool` message, and the policy takes another turn. A turn
without a call is the answer, and ends the episode; the run's reward functions
(`lorasync.tasks.arith:correct`) judge it, as in single-turn `arith`. A call that is not
arithmetic gets an error message back, not a failure: reading it is part of the task.

Rows are `arith`'s (same problems, same splits, same seeds), the question followed by the
tool's instructions, after two worked exchanges (`DEMONSTRATION`): a small model does not call a
tool it is only told about. Measured on SmolLM2-135M-Instruct, 26 `mul` test questions x 8
samples at temperature 1: the instructions alone got a closed call in 1 of 208 samples, with
the demonstration 85 of 208 (greedy: 0 of 26, then 10 of 26). The demonstrated questions lie
outside every `arith` level's operands, so none is a test question: `lorasync train` with `data.task: calc` and
`rollout.environment: lorasync.tasks.calculator:Calculator`, `lorasync eval --task calc`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Sequence

from lorasync.environments.protocol import Reply
from lorasync.tasks.arith import DEFAULT_LEVELS, SPLITS, check_levels  # noqa: F401 (the task's interface)
from lorasync.tasks.arith import QUESTION
from lorasync.tasks.arith import rows as arith_rows

ENVIRONMENT = "lorasync.tasks.calculator:Calculator"  # what `lorasync eval --task calc` plays
INSTRUCTIONS = "You may use a calculator: write <calc>expression</calc> and read the result."
# Two worked exchanges before the question, (a, op, b): the call, the tool's result, the answer.
DEMONSTRATION = ((21, "*", 3), (250, "+", 17))
CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 30  # results beyond this are refused (a policy could ask for 9**9**9)


def rows(split: str, n: int, seed: int = 0, levels: Sequence[str] = DEFAULT_LEVELS) -> list[dict]:
    """`arith.rows`, each question followed by the calculator's instructions, after the
    `DEMONSTRATION` exchanges."""
    out = arith_rows(split, n, seed, levels)
    for row in out:
        message = row["prompt"][0]
        row["prompt"] = [*demonstration(), {"role": message["role"], "content": f"{message['content']} {INSTRUCTIONS}"}]
    return out


def demonstration() -> list[dict]:
    """The `DEMONSTRATION` as chat messages: the question, the call, the tool's result, the answer."""
    messages = []
    for a, op, b in DEMONSTRATION:
        expression = f"{a} {op} {b}"
        result = calculate(expression)
        messages += [
            {"role": "user", "content": f"{QUESTION.format(a=a, op=op, b=b)} {INSTRUCTIONS}"},
            {"role": "assistant", "content": f"<calc>{expression}</calc>"},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": result},
        ]
    return messages


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (numbers, + - * /, parentheses) as text, or an
    error message the policy reads. Whole results print as integers ("42", not "42.0")."""
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as err:
        return f"error: {err}" if str(err) else "error: not arithmetic"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        if abs(value) >= 10**MAX_DIGITS:
            raise ValueError("result too large")
        return value
    raise ValueError("only numbers, + - * / and parentheses")


class Calculator:
    """The calculator environment of one episode (`environments.protocol.Environment`)."""

    def __init__(self, row: dict) -> None:
        self.calls = 0

    def step(self, text: str) -> Reply:
        """The result of the turn's first call; no call: the turn is the answer, the end."""
        call = CALL.search(text)
        if call is None:
            return Reply.end()
        self.calls += 1
        return Reply.say(calculate(call.group(1)))
