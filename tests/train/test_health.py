"""The live verdict in training (train/health.py): a weight mismatch or logprob statistics out
of the floor's bounds warn, with their numbers; a right step does not."""

from lorasync.sync.verify import TOLERANCES, Verification
from lorasync.train.health import health_of, health_warning, weight_metrics
from lorasync.sync.weight_check import WeightCheck

TOL = TOLERANCES["float32"]
FLOOR = Verification(4e-5, 1e-5, 500, 3.5e-5)


def row(mean=1e-5, quantile=3e-5, maximum=2e-4, **extra):
    return {"step": 7, "logprob_diff_mean": mean, "logprob_diff_quantile": quantile,
            "logprob_diff_max": maximum, "completion_tokens": 64, **extra}


def test_a_right_step_does_not_warn_even_with_one_extreme_token():
    assert health_warning(row(), TOL, FLOOR) is None  # max 2e-4 > the old fixed 1e-4: not judged


def test_logprobs_off_the_floor_warn_with_their_numbers():
    warning = health_warning(row(mean=1e-3), TOL, FLOOR)
    assert warning.startswith("warning: step 7:") and "mean 0.001 (bound" in warning
    assert "not serving the trained policy" in warning


def test_without_a_floor_the_tolerance_judges_the_max():
    assert health_warning(row(maximum=5e-5), TOL, None) is None
    assert "max 0.0002 (bound 0.0001)" in health_warning(row(), TOL, None)


def test_a_weight_mismatch_warns_and_names_the_tensor():
    check = WeightCheck(30, 2, 0.25, "model.layers.3.self_attn.q_proj.weight", 0.25, True, 0, 0.1)
    warning = health_warning(row() | weight_metrics(check), TOL, FLOOR)
    assert "2 of 30 weight tensors differ" in warning and "layers.3.self_attn.q_proj" in warning
    ok = WeightCheck(30, 0, 0.0, None, 0.0, True, 0, 0.1)
    assert health_warning(row() | weight_metrics(ok), TOL, FLOOR) is None
    assert weight_metrics(None) == {}


def test_a_steps_health_reads_back_as_a_verification():
    assert health_of(row()) == Verification(2e-4, 1e-5, 64, 3e-5)


def test_a_skipped_update_warns_without_blaming_the_engine():
    warning = health_warning(row(skipped_updates=1), TOL, FLOOR)
    assert warning == "warning: step 7: 1 update(s) skipped: the gradient held NaN or Inf"
