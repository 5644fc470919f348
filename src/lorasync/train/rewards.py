"""Reward functions: loading them by name, and the toy rewards the demo and tests use.

Reward functions have TRL's signature, `fn(prompts, completions, **columns) -> list[float]`:
one float per completion; `columns` holds the dataset's other fields, repeated per completion.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

RewardFn = Callable[..., list[float]]


def load_reward(path: str) -> RewardFn:
    """Import `package.module:function`; raise ValueError naming what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def digit_fraction(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Share of the completion's non-space characters that are digits (0 for empty text)."""
    scores = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        scores.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return scores

