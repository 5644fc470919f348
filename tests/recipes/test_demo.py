"""`lorasync demo`: the embedded default. SmolLM2-135M-Instruct learns arithmetic, measured
before and after on held-out problems through the engine it trains with; `--tiny` is the
download-free toy run (its learning is tested in tests/train/test_trainer.py)."""

import json
from pathlib import Path

import pytest

from lorasync.commands.cli import build_parser
from lorasync.recipes.demo import DEMO_STEPS, demo_config, real_demo_config
from lorasync.train.config import config_to_dict, load_config

YAML = Path(__file__).parents[2] / "configs" / "smollm2_arith.yaml"


def test_the_demo_runs_configs_smollm2_arith_yaml_for_fewer_steps(tmp_path):
    demo = config_to_dict(real_demo_config(tmp_path, "models/smollm2"))
    yaml = config_to_dict(load_config(YAML, [f"output_dir={tmp_path}", "save_every=0", f"optim.steps={DEMO_STEPS}"]))
    assert demo == yaml


def test_the_tiny_demo_runs_configs_digits_yaml_with_its_prompts_inline_and_no_accumulation(tmp_path):
    """`demo_config` stays code (`lorasync demo --tiny` runs from an installed package, which
    ships no configs/, and draws its prompts from --seed), kept to configs/digits.yaml: the
    same run with one micro-batch, no intermediate checkpoints, and the prompts of
    configs/digits_prompts.jsonl (those of seed 0) inline."""
    digits = YAML.parent / "digits.yaml"
    prompts_file = YAML.parent / "digits_prompts.jsonl"
    demo = config_to_dict(demo_config(tmp_path, steps=60))
    yaml = config_to_dict(load_config(digits, [
        f"model.base={tmp_path / 'base'}", f"output_dir={tmp_path}", f"data.path={prompts_file}",
        "optim.grad_accum=1", "save_every=0",
    ]))
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    assert yaml["data"].pop("path") == str(prompts_file) and yaml["data"]["prompts"] == []
    yaml["data"]["prompts"] = prompts
    assert demo["data"].pop("path") == ""
    assert demo == yaml


def test_demo_flags():
    parser = build_parser()
    args = parser.parse_args(["demo"])
    assert (args.tiny, args.steps, args.out) == (False, None, "runs/demo")
    args = parser.parse_args(["demo", "--tiny", "--steps", "5"])
    assert (args.tiny, args.steps) == (True, 5)


@pytest.mark.real_model
def test_demo_on_the_real_model(smollm2, tmp_path):
    """Two steps, 16 problems: the run, both evaluations and the summary, on the real model
    (the gain itself takes more steps: docs/measurements.md, and the issue's note)."""
    from lorasync.recipes.demo import run_demo

    summary = run_demo(tmp_path, steps=2, eval_problems=16, progress=False)
    assert summary["steps"] == 2 and summary["eval_problems"] == 16
    assert summary["weight_version_after"] == 2  # the after-measure served the trained policy
    for when in ("accuracy_before", "accuracy_after"):
        assert set(summary[when]) == {"T=0", "T=1"}
        assert all(0 <= a <= 1 for a in summary[when].values())
    assert summary["logprob_diff_max"] <= 1e-4
    assert len(summary["samples"]) == 5 and all(s["before"] and s["after"] for s in summary["samples"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "report.png").is_file()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
