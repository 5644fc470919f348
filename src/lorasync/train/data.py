"""Prompt datasets for training: a JSONL file, a `datasets` folder, an inline list of prompts, or
a generated task (`lorasync.tasks`).

Rows are dicts; the prompt is in `prompt_field`, and the other fields reach the reward
functions as keyword arguments (TRL's convention).
"""

from __future__ import annotations

import random
from pathlib import Path

from lorasync.train.config import DataConfig


def load_rows(config: DataConfig) -> list[dict]:
    """All rows of the prompt dataset; raise ValueError for an empty or malformed one."""
    if config.task:
        from lorasync.tasks.registry import TASKS

        task = TASKS[config.task]
        rows = task.rows(config.split, config.size, seed=0, levels=config.levels or task.DEFAULT_LEVELS)
    elif config.prompts:
        rows = [{config.prompt_field: p} for p in config.prompts]
    else:
        path = Path(config.path)
        if not path.exists():
            raise FileNotFoundError(f"data.path {config.path!r} does not exist")
        import datasets

        if path.is_dir():
            rows = datasets.load_from_disk(str(path)).to_list()
        else:
            rows = datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    if not rows:
        raise ValueError(f"the prompt dataset ({config.path or 'data.prompts'}) is empty")
    if config.prompt_field not in rows[0]:
        raise ValueError(
            f"data.prompt_field = {config.prompt_field!r} is not a field of the dataset "
            f"(fields: {', '.join(rows[0])}); set data.prompt_field"
        )
    return rows


def batch_at(rows: list[dict], step: int, size: int, seed: int) -> list[dict]:
    """The prompts of optimizer step `step`: epochs of a seeded shuffle, so a resumed run
    draws exactly the batches the uninterrupted run would have drawn."""
    out = []
    for i in range(step * size, (step + 1) * size):
        epoch, index = divmod(i, len(rows))
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(rows[order[index]])
    return out
