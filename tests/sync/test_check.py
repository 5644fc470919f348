"""The sync-check's engine-free core (`lorasync.sync.check`): on an in-memory engine that scores
with the weights it was sent, a right sync passes against the floor and a lost one fails; and
the verdict a user reads (`format_sync_check`). With a real engine: tests/backend/test_check.py
and the CLI's tests."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from lorasync.sync.base import Strategy
from lorasync.sync.check import check_sync, format_sync_check
from lorasync.sync.verify import trainer_scores
from tests.helpers import MemoryReceiver, policy


class ScoringReceiver(MemoryReceiver):
    """A `MemoryReceiver` that is also a `Scorer`: transformers on what it serves now."""

    def score(self, sequences):
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
        model.load_state_dict(self.served())
        return trainer_scores(model, sequences)


class LosingReceiver(ScoringReceiver):
    """Takes every load and keeps none of it: it serves the checkpoint whatever its version."""

    def load_weights(self, weights):
        version = super().load_weights(weights)
        self.tensors.clear()
        return version


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lorasync.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("check") / "base", arch="llama"))


def test_a_right_sync_passes_against_the_floor(base):
    engine = ScoringReceiver(base)
    result = check_sync(policy(base, rank=4), engine, Strategy.STREAMING, base=base, dtype="float32", repeat=2)
    assert result["ok"] and result["logprob_ok"] and result["judged_against"] == "floor"
    assert result["weight_check"] is None  # this engine cannot read its weights back
    assert result["weight_version"] == engine.weight_version == 2 and len(result["sync_seconds_all"]) == 2
    assert result["max_abs_logprob_diff"] < 1e-4 and result["base_max_abs_change"] == 0
    assert result["per_scorer_max_abs_logprob_diff"] == [result["max_abs_logprob_diff"]]
    assert (result["strategy"], result["dtype"]) == ("streaming", "float32")
    assert format_sync_check(result).startswith("OK: streaming")


def test_a_lost_sync_fails_and_the_worst_scorer_decides(base):
    model = policy(base, rank=4)
    result = check_sync(model, LosingReceiver(base), Strategy.STREAMING, base=base, dtype="float32")
    assert not result["ok"] and not result["logprob_ok"]
    # judged by each scorer: one that serves the policy does not hide one that does not
    right, lost = ScoringReceiver(base), LosingReceiver(base)
    result = check_sync(model, right, Strategy.STREAMING, base=base, dtype="float32",
                        tolerance=1e-4, scorers=[right, lost])
    assert result["judged_against"] == "tolerance" and not result["ok"]
    per_scorer = result["per_scorer_max_abs_logprob_diff"]
    assert per_scorer[0] < 1e-4 < per_scorer[1] == result["max_abs_logprob_diff"]


def test_a_sync_check_verdict_prints_both_levels_with_their_numbers():
    """What a user sees when the verdict fails: each level's numbers and bounds, the tensor."""
    result = {
        "ok": False, "strategy": "streaming", "tensors_sent": 272, "bytes_sent": 538e6,
        "sync_seconds": 1.5, "weight_version": 1, "base_max_abs_change": 0.0,
        "weight_check": {"ok": False, "exact": True, "tensors": 273, "mismatches": 1,
                         "max_abs_diff": 0.0125, "unread": 0,
                         "first_mismatch": "model.layers.1.self_attn.q_proj.weight", "first_mismatch_diff": 0.0125},
        "judged_against": "floor", "floor_mean_abs_logprob_diff": 1e-5,
        "floor_quantile_abs_logprob_diff": 3.5e-5, "floor_max_abs_logprob_diff": 4e-5,
        "logprob_ok": True, "probe_tokens": 496,
        "logprob_verdict": "max 4.1e-05, mean 1.1e-05 (bound 2.5e-05), p99 3.6e-05 (bound 8e-05)",
    }
    text = format_sync_check(result)
    assert text.startswith("MISMATCH: streaming")
    assert "weights MISMATCH: 273 tensors compared bit for bit, 1 differ" in text
    assert "first: model.layers.1.self_attn.q_proj.weight (by 0.0125)" in text
    assert "logprobs ok over 496 tokens: max 4.1e-05, mean 1.1e-05 (bound 2.5e-05)" in text
    assert "floor (adapter off, before the sync: mean 1e-05, p99 3.5e-05, max 4e-05)" in text
    result |= {"weight_check": None, "judged_against": "tolerance", "tolerance": 1e-4}
    text = format_sync_check(result)
    assert "weights: not read back" in text and "fixed tolerance 0.0001" in text
    assert "cache: not checked" in text


class GeneratingReceiver(ScoringReceiver):
    """A `ScoringReceiver` that also generates: three fixed tokens per prompt, with the
    logprobs its scoring gives them, or, with `stale`, those of the checkpoint (what keys and
    values of the old weights left in a prefix cache would give)."""

    stale = False

    def generate(self, prompts, max_tokens, temperature=1.0, n=1, seed=None):
        from lorasync.sync.base import Completion

        tokens = [5, 6, 7]
        sequences = [list(p) + tokens for p in prompts]
        if self.stale:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
            scores = trainer_scores(model, sequences)
        else:
            scores = self.score(sequences)
        return [[Completion(tokens, "", s[-3:])] for s in scores]


def test_the_cache_level_passes_a_right_cache_and_catches_a_stale_one(base, monkeypatch):
    monkeypatch.setattr("lorasync.sync.verify.CACHE_PROBE_LENGTH", 20)  # a tiny model's context
    model = policy(base, rank=4)
    result = check_sync(model, GeneratingReceiver(base), Strategy.STREAMING, base=base, dtype="float32")
    assert result["ok"] and result["cache_ok"] and result["cache_check"]["floor"]["max_abs_diff"] == 0
    assert "cache ok over 24 generated tokens" in format_sync_check(result)
    stale = GeneratingReceiver(base)
    stale.stale = True  # generation keeps serving the checkpoint after the sync
    result = check_sync(model, stale, Strategy.STREAMING, base=base, dtype="float32")
    assert result["logprob_ok"] and not result["cache_ok"] and not result["ok"]
    assert "cache MISMATCH" in format_sync_check(result)
