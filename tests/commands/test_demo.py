"""`lorasync demo`: the embedded default. SmolLM2-135M-Instruct learns arithmetic, measured
before and after on held-out problems through the engine it trains with; `--tiny` is the
download-free toy run (its learning is tested in tests/train/test_trainer.py)."""

import json
from pathlib import Path

import pytest

from lorasync.commands.cli import build_parser
from lorasync.commands.demo import DEMO_STEPS, real_demo_config
from lorasync.train.config import config_to_dict, load_config

YAML = Path(__file__).parents[2] / "configs" / "smollm2_arith.yaml"


def test_the_demo_runs_configs_smollm2_arith_yaml_for_fewer_steps(tmp_path):
    demo = config_to_dict(real_demo_config(tmp_path, "models/smollm2"))
    yaml = config_to_dict(load_config(YAML, [f"output_dir={tmp_path}", "save_every=0", f"optim.steps={DEMO_STEPS}"]))
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
    (the gain itself takes more steps: README, and the issue's note)."""
    from lorasync.commands.demo import run_demo

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
