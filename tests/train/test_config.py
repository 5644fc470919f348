"""Run configuration: YAML plus overrides, and errors that name the field, the value and the fix."""

from pathlib import Path

import pytest
import yaml

from lorasync.config import ConfigError, load_config

ROOT = Path(__file__).parent.parent


def write(tmp_path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def minimal():
    return {
        "model": {"base": "some/model"},
        "data": {"prompts": ["a", "b"]},
        "rewards": [{"function": "lorasync.rewards:digit_fraction"}],
    }


def test_example_config_loads():
    config = load_config(ROOT / "configs" / "digits.yaml")
    assert config.rollout.num_generations == 8 and config.optim.grad_accum == 2


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(write(tmp_path, minimal()), ["optim.lr=1e-3", "rollout.num_generations=4", "output_dir=x"])
    assert config.optim.lr == 1e-3 and config.rollout.num_generations == 4 and config.output_dir == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.num_generations=1", "rollout.num_generations = 1: GRPO compares completions"),
        ("optim.lr=0", "optim.lr = 0.0: must be > 0"),
        ("optim.grad_accum=3", "optim.grad_accum = 3: must divide prompts_per_step * num_generations = 32"),
        ("optim.lrr=1", "optim.lrr: unknown field; valid fields are"),
        ("sync_strategy=fast", "sync_strategy = 'fast': use streaming or merge-unmerge"),
        ("model.dtype=float16", "model.dtype = 'float16': use float32 or bfloat16"),
        ("learning_rate=1", "learning_rate: unknown field"),
        ("optim.lr", "write it as section.field=value"),
        ("optim.lr=fast", "optim.lr = .fast.: must be a number"),
        ("optim.steps=2.5", "optim.steps = 2.5: must be a whole number"),
    ],
)
def test_bad_values_name_field_value_and_fix(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        load_config(write(tmp_path, minimal()), [override])


def test_rewards_and_data_are_required(tmp_path):
    raw = minimal() | {"rewards": []}
    with pytest.raises(ConfigError, match="list at least one reward function"):
        load_config(write(tmp_path, raw))
    raw = minimal() | {"data": {}}
    with pytest.raises(ConfigError, match="set exactly one"):
        load_config(write(tmp_path, raw))


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
