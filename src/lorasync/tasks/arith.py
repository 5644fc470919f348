"""Arithmetic word-free problems as chat prompts, their answers, and the rewards that score them.

Rows are TRL's conversational prompt format plus the columns the rewards read:

    {"prompt": [{"role": "user", "content": "What is 17 + 25? Answer with the number only."}],
     "answer": 42, "level": "add2"}

Each level is a family of problems (`LEVELS`). Every problem belongs to one split, `train`
or `test`, by a stable hash of the problem itself (commutative problems by their sorted
operands, so 17 + 25 and 25 + 17 share a split): the splits are disjoint by construction and
the same on every machine, whatever the seed. The seed only chooses which problems `rows`
draws and in what order.

Rewards have TRL's signature (`fn(prompts, completions, **columns) -> list[float]`), for a
run's config as `lorasync.tasks.arith:correct` and `lorasync.tasks.arith:number_only`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
QUESTION = "What is {a} {op} {b}? Answer with the number only."


@dataclass(frozen=True)
class Level:
    """A family of problems: `a op b` for a in `a_range`, b in `b_range` (`a >= b` when
    subtracting: answers are never negative)."""

    op: str
    a_range: range
    b_range: range

    def problems(self) -> list[tuple[int, int]]:
        return [(a, b) for a in self.a_range for b in self.b_range if self.op != "-" or a >= b]

    def answer(self, a: int, b: int) -> int:
        return {"+": a + b, "-": a - b, "*": a * b}[self.op]


LEVELS = {
    "add1": Level("+", range(1, 10), range(1, 10)),
    "add2": Level("+", range(10, 100), range(10, 100)),
    "sub2": Level("-", range(10, 100), range(10, 100)),
    "mul": Level("*", range(2, 20), range(2, 20)),
}
# The default mix: levels whose outcomes, sampled at T=1 from SmolLM2-135M-Instruct (fp32,
# vLLM, max 16 tokens, cut-off completions scoring 0), are mixed within groups of 8 often
# enough for GRPO to learn from. Measured on 24 train problems per level: mixed groups add1
# 62%, mul 29%, add2 21%, sub2 8% (accuracy 13%, 8%, 3%, 2%); sub2 is left out by default.
DEFAULT_LEVELS = ("add1", "add2", "mul")


def split_of(op: str, a: int, b: int) -> str:
    """The split the problem `a op b` belongs to: a stable hash, not a random draw."""
    if op in "+*":
        a, b = sorted((a, b))
    digest = hashlib.sha256(f"{op}:{a}:{b}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def check_levels(levels: Sequence[str]) -> list[str]:
    """The levels by name; ValueError naming the known ones for an unknown or empty list."""
    unknown = [name for name in levels if name not in LEVELS]
    if unknown or not levels:
        raise ValueError(f"arith levels must be some of {', '.join(LEVELS)}, got {list(levels)}")
    return list(levels)


def rows(split: str, n: int, seed: int = 0, levels: Sequence[str] = DEFAULT_LEVELS) -> list[dict]:
    """`n` problems of `split`, the levels taking turns, in a seeded order.

    Within a level, problems are drawn without replacement; a level with fewer problems in
    the split than it is asked for starts over, reshuffled (the test split holds 16 add1
    problems, 1603 add2, 792 sub2 and 52 mul).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    levels = check_levels(levels)
    rng = random.Random(f"arith:{split}:{seed}")
    pools: dict[str, list[tuple[int, int]]] = {name: [] for name in levels}
    out = []
    for i in range(n):
        name = levels[i % len(levels)]
        level = LEVELS[name]
        if not pools[name]:
            pools[name] = [p for p in level.problems() if split_of(level.op, *p) == split]
            rng.shuffle(pools[name])
        a, b = pools[name].pop()
        content = QUESTION.format(a=a, op=level.op, b=b)
        out.append({"prompt": [{"role": "user", "content": content}],
                    "answer": level.answer(a, b), "level": name})
    rng.shuffle(out)
    return out


# --- answers and rewards --------------------------------------------------------------------

# A number: thousands grouped by commas or not, maybe a decimal part. A minus sign counts only
# where it cannot be subtraction (not right after a letter or digit: "17-5" is 5).
_NUMBER = re.compile(r"(?<![\w.])(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_answer(text: str) -> int | None:
    """The integer the text ends its answer with: its last number ("17 + 25 = 42" is 42).

    "-7" is -7, "1,234" is 1234, "42." and "42.0" are 42; None when there is no number or the
    last one is not a whole number ("3.5").
    """
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    whole, _, fraction = numbers[-1].replace(",", "").partition(".")
    if fraction.strip("0"):
        return None
    return int(whole)


def _text(completion) -> str:
    """A completion's text: a string, or TRL's conversational form (a list of messages)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct(prompts: list, completions: list, answer: list[int],
            truncated: list[bool] | None = None, **columns) -> list[float]:
    """1.0 when the completion's last number equals the row's `answer`, else 0.0; a completion
    marked `truncated` (cut off at the token limit) gets 0.0 whatever it says."""
    cut = truncated if truncated is not None else [False] * len(completions)
    return [
        float(not was_cut and parse_answer(_text(c)) == int(a))
        for c, a, was_cut in zip(completions, answer, cut, strict=True)
    ]


_JUST_A_NUMBER = re.compile(r"\s*(?:the answer is:?\s*)?-?[\d,]+(?:\.\d+)?\.?\s*", re.IGNORECASE)


def number_only(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 when the completion is just a number (maybe "The answer is N."), else 0.0."""
    return [float(_JUST_A_NUMBER.fullmatch(_text(c)) is not None) for c in completions]
