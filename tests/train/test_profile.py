"""`train/profile.StepProfile`: a step's seconds by phase, the tokens of the trainer's passes
(those with gradients apart), and the rate they reached; a training run writes them to each
row of metrics.jsonl."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lorasync.train.profile import PHASES, StepProfile, body_parameters
from tests.helpers import ReplayEngine, demo_trainer_config, policy


def test_phases_add_up_and_only_the_scoring_and_update_passes_count_tokens(tiny_model):
    model = policy(tiny_model("qwen2"))
    profile = StepProfile(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with profile.phase("score"), torch.no_grad():
        model(input_ids=ids)
    with profile.phase("forward"):
        model(input_ids=ids[:, :3])
        with profile.phase("backward"):  # a phase inside another counts for itself
            time.sleep(0.01)
    with profile.phase("health"), torch.no_grad():
        model(input_ids=ids)  # the health check's passes are not the trainer's work
    model(input_ids=ids)  # outside any phase: not counted either
    profile.add("generation", 2.5)
    row = profile.metrics()
    assert set(row) == {f"seconds_{p}" for p in PHASES} | {"trainer_tokens", "trainer_gflops", "activation_bytes"}
    assert row["seconds_generation"] == 2.5 and row["seconds_backward"] >= 0.01
    assert row["seconds_sync"] == 0.0
    assert profile.tokens == {"no_grad": 4, "grad": 3} and row["trainer_tokens"] == 7
    passes = row["seconds_score"] + row["seconds_forward"] + row["seconds_backward"]
    flops = 2 * body_parameters(model) * (4 + 2 * 3)
    assert row["trainer_gflops"] == pytest.approx(flops / passes / 1e9)
    profile.reset()
    assert profile.metrics()["trainer_tokens"] == 0 and profile.metrics()["trainer_gflops"] == 0.0
    with pytest.raises(ValueError, match="unknown phase 'train'"):
        with profile.phase("train"):
            pass


def test_the_body_leaves_out_embeddings_and_head(tiny_model):
    model = policy(tiny_model("llama"))
    every = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    assert body_parameters(model) == every - head - embed  # llama: untied, both left out


@pytest.mark.slow  # a short run: about 1.5 s
def test_a_run_writes_its_profile_to_each_row(tiny_model, tmp_path):
    from lorasync.train.trainer import GRPOTrainer

    model_dir = tiny_model("qwen2")
    config = demo_trainer_config(model_dir, tmp_path, steps=2, optim={"num_iterations": 2})
    GRPOTrainer(config, ReplayEngine(model_dir)).train(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert all(row[f"seconds_{p}"] >= 0 for p in PHASES)
        assert row["seconds_forward"] > 0 and row["seconds_backward"] > 0 and row["seconds_optimizer"] > 0
        assert row["seconds_score"] > 0  # two updates a batch: the old logprobs in a pass of their own
        assert row["trainer_gflops"] > 0
        assert sum(row[f"seconds_{p}"] for p in PHASES) <= row["step_seconds"] + 1e-6


def test_activation_bytes_are_what_the_forward_pass_keeps(tiny_model):
    """Memory the forward phase leaves allocated (activations, kept for backward) counts;
    memory it frees before it ends does not."""
    profile = StepProfile(policy(tiny_model("qwen2")))
    with profile.phase("forward"):
        torch.ones(50_000_000).sum()  # 200 MB, freed inside the phase
    assert profile.metrics()["activation_bytes"] < 100e6
    with profile.phase("forward"):
        kept = torch.ones(50_000_000)  # 200 MB, held past the phase (as backward would)
    assert profile.metrics()["activation_bytes"] >= 150e6
    del kept
