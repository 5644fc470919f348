"""Run configuration: YAML plus overrides, and errors that name the field, the value and the fix."""

import re
from pathlib import Path

import pytest
import yaml

from lorasync.sync.base import Strategy
from tests.helpers import run_lorasync
from lorasync.train.config import ConfigError, config_from_dict, config_to_dict, load_config

ROOT = Path(__file__).parents[2]


def write(tmp_path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def minimal():
    return {
        "model": {"base": "some/model"},
        "data": {"prompts": ["a", "b"]},
        "rewards": [{"function": "lorasync.train.rewards:digit_fraction"}],
    }


def test_example_config_loads():
    config = load_config(ROOT / "configs" / "digits.yaml")
    assert config.rollout.num_generations == 8 and config.optim.grad_accum == 2


def test_the_multi_turn_config_loads_and_names_its_environment():
    config = load_config(ROOT / "configs" / "smollm2_calc.yaml")
    assert config.rollout.environment == "lorasync.tasks.calculator:Calculator"
    assert config.rollout.limits.max_tokens == config.rollout.max_tokens == 24
    assert config.engine.max_model_len >= 60 + config.rollout.episode_tokens


def test_a_bad_environment_setting_names_the_field_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="rollout.environment = 'calculator': write it as 'package.module:Class'"):
        load_config(write(tmp_path, minimal()), ["rollout.environment=calculator"])
    with pytest.raises(ConfigError, match="rollout.env_timeout = 0.0: must be > 0 seconds"):
        load_config(write(tmp_path, minimal()), ["rollout.env_timeout=0"])


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
        ("sync_strategy=streaming", "sync_strategy = 'streaming': this key moved to sync.strategy"),
        ("sync.strategy=fast", "sync.strategy must be one of streaming, merge-unmerge, adapter, factors, auto, got 'fast'"),
        ("model.dtype=int8", "model.dtype = 'int8': use one of float32, bfloat16, float16"),
        ("engine.kind=remote", "engine.kind = 'remote': use one of colocated, server"),
        ("engine.kind=server", "engine.servers = []: engine.kind: server needs the URLs of running"),
        ("engine.servers=[http://127.0.0.1:8000]", "engine.servers = ['http://127.0.0.1:8000']: servers are for engine.kind: server"),
        ("sync.strategy=factors", "sync.strategy = 'factors' does not work with engine.kind = 'colocated', which takes streaming, merge-unmerge, adapter, auto: use one of those, or engine.kind = 'server'"),
        ("engine.max_model_len=1", "engine.max_model_len = 1: must be >= 2"),
        ("learning_rate=1", "learning_rate: unknown field"),
        ("optim.lr", "write it as section.field=value"),
        ("optim.lr=fast", "optim.lr = 'fast': must be a number"),
        ("optim.steps=2.5", "optim.steps = 2.5: must be a whole number"),
    ],
)
def test_bad_values_name_field_value_and_fix(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, minimal()), [override])


def test_engine_and_sync_sections_reach_every_strategy(tmp_path):
    servers = ["engine.kind=server", "engine.servers=[http://127.0.0.1:8000, http://127.0.0.1:8001]"]
    config = load_config(write(tmp_path, minimal()), [*servers, "sync.strategy=factors"])
    assert config.engine.servers == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    assert config.sync.strategy is Strategy.FACTORS
    # unset, the strategy is the engine kind's default
    assert load_config(write(tmp_path, minimal()), servers).sync.strategy is Strategy.FACTORS
    assert load_config(write(tmp_path, minimal())).sync.strategy is Strategy.STREAMING
    for strategy in ("streaming", "merge-unmerge", "adapter", "auto"):
        assert load_config(write(tmp_path, minimal()), [f"sync.strategy={strategy}"]).sync.strategy == strategy
    with pytest.raises(ConfigError, match="'adapter' does not work with engine.kind = 'server'.*or engine.kind = 'colocated'"):
        load_config(write(tmp_path, minimal()), [*servers, "sync.strategy=adapter"])
    with pytest.raises(ConfigError, match="engine.servers\\[\\] = 'localhost:8000': write each server as a URL"):
        load_config(write(tmp_path, minimal()), ["engine.kind=server", "engine.servers=[localhost:8000]"])


@pytest.mark.slow  # a fresh `lorasync` process: torch and transformers imported, 5-10 s on 2 cores
def test_train_refuses_a_pair_that_cannot_work_before_anything_starts(tmp_path):
    r = run_lorasync(
        "train", "--config", str(ROOT / "configs" / "digits.yaml"), "model.base=no/such/model",
        "sync.strategy=factors", f"output_dir={tmp_path}",
    )
    assert r.returncode == 2
    assert "sync.strategy = 'factors' does not work with engine.kind = 'colocated'" in r.stderr
    assert not any(tmp_path.iterdir())


def test_config_round_trips_through_plain_data(tmp_path):
    config = load_config(write(tmp_path, minimal()), ["sync.strategy=merge-unmerge", "optim.num_iterations=2"])
    again = config_from_dict(config_to_dict(config))
    assert again == config and config_to_dict(again)["sync"]["strategy"] == "merge-unmerge"


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
