"""The environment protocol: what an environment is, what it answers, and how a config names one.

An environment plays one episode. It is built from the episode's dataset row
(`Environment(row)`), and after each of the policy's turns it gets that turn's text and
answers with a `Reply`: a message (`Reply.say`), which is added to the conversation in the
chat template's format before the policy's next turn, or the end of the episode
(`Reply.end`), with a reward of its own or none (then the run's reward functions alone score
the episode). The runner (`episodes.py`) bounds an episode by a turn limit and a token budget,
runs each step in a worker thread under a timeout, and ends an episode whose environment
raises, hangs or answers something that is not a `Reply` with reward 0 and the reason logged.

    class Echo:
        def __init__(self, row: dict) -> None:
            self.turns = 0

        def step(self, text: str) -> Reply:
            self.turns += 1
            return Reply.say(f"you said {len(text)} characters") if self.turns < 2 else Reply.end()

A config names the class as `rollout.environment: package.module:Class`, like a reward
function (`train/rewards.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

ROLES = ("tool", "user", "system")  # the roles an environment may speak in (never the assistant's)


@dataclass(frozen=True)
class Reply:
    """An environment's answer to a policy turn: a message to go on with, or the end."""

    text: str | None = None  # None: the episode ends
    role: str = "tool"
    reward: float | None = None  # at the end only: added to the reward functions' sum

    def __post_init__(self) -> None:
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"Reply.text = {self.text!r}: give a string, or None to end the episode")
        if self.role not in ROLES:
            raise ValueError(f"Reply.role = {self.role!r}: use one of {', '.join(ROLES)}")
        if self.text is not None and self.reward is not None:
            raise ValueError("Reply: a reward ends the episode; give text (go on) or reward (end), not both")

    @property
    def done(self) -> bool:
        return self.text is None

    @classmethod
    def say(cls, text: str, role: str = "tool") -> Reply:
        """Go on: `text` is added as a `role` message, then the policy takes its next turn."""
        return cls(text=text, role=role)

    @classmethod
    def end(cls, reward: float | None = None) -> Reply:
        """End the episode, with a reward of the environment's own or none."""
        return cls(reward=None if reward is None else float(reward))


@runtime_checkable
class Environment(Protocol):
    """One episode's environment, built from its dataset row."""

    def step(self, text: str) -> Reply:
        """Answer the policy's latest turn (its text, decoded)."""
        ...


EnvironmentFactory = Callable[[dict], Environment]


def load_environment(path: str) -> EnvironmentFactory:
    """Import `package.module:Class`; ValueError naming what is missing or wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"environment {path!r}: write it as 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"environment {path!r}: cannot import module {module_name!r} ({err})") from err
    cls = getattr(module, attr, None)
    if not callable(cls) or not callable(getattr(cls, "step", None)):
        raise ValueError(
            f"environment {path!r}: {module_name!r} has no class {attr!r} with a step(text) method "
            "(lorasync.environments.protocol.Environment)"
        )
    return cls
