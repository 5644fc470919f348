"""Tasks with checkable answers: prompts (TRL's conversational format) and reward functions.
`arith.py`: arithmetic problems, scored by the final number.

Each task module has `rows(split, n, seed, levels)`, `SPLITS`, `DEFAULT_LEVELS` and `check_levels`.
"""

from lorasync.tasks import arith

TASKS = {"arith": arith}
