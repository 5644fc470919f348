"""Prompt datasets: JSONL, a `datasets` folder and an inline list give the same rows; batches
are a seeded shuffle per epoch, so a resumed run draws what the uninterrupted one would."""

import json

import datasets
import pytest


from lorasync.tasks import arith
from lorasync.train.config import ConfigError, DataConfig
from lorasync.train.data import batch_at, load_rows

ROWS = [{"prompt": f"p{i}", "answer": i} for i in range(5)]


def test_jsonl_dataset_folder_and_list_agree(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(DataConfig(path=str(tmp_path / "p.jsonl"))) == ROWS
    assert load_rows(DataConfig(path=str(tmp_path / "ds"))) == ROWS
    assert load_rows(DataConfig(prompts=["a", "b"])) == [{"prompt": "a"}, {"prompt": "b"}]


def test_bad_datasets_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(DataConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="data.prompt_field = 'prompt' is not a field"):
        load_rows(DataConfig(path=str(tmp_path / "q.jsonl")))


def test_batches_cover_each_epoch_once_and_are_reproducible():
    epoch = [r["prompt"] for step in range(5) for r in batch_at(ROWS, step, 1, seed=3)]
    assert sorted(epoch) == [r["prompt"] for r in ROWS]
    assert batch_at(ROWS, 7, 2, seed=3) == batch_at(ROWS, 7, 2, seed=3)


def test_a_task_generates_its_rows():
    config = DataConfig(task="arith", split="test", size=30, levels=["mul"])
    rows = load_rows(config)
    assert rows == arith.rows("test", 30, seed=0, levels=["mul"])
    assert all(isinstance(r["prompt"], list) and r["level"] == "mul" for r in rows)
    with pytest.raises(ConfigError, match="data.task = 'algebra': must be one of arith"):
        DataConfig(task="algebra")
    with pytest.raises(ConfigError, match="set exactly one"):
        DataConfig(task="arith", path="x.jsonl")
    with pytest.raises(ValueError, match="levels must be some of"):
        DataConfig(task="arith", levels=["div"])
