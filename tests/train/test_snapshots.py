"""`PolicySnapshots`: the policy of each recent version, and the per-token health check."""

import pytest
import torch

from lorasync.train.snapshots import PolicySnapshots


class Policy(torch.nn.Module):
    """Logprobs (B, T) that are a function of one trainable tensor: w[b, t]."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 4))
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def score(self) -> torch.Tensor:
        return self.w.detach().clone()


def test_each_token_is_checked_against_the_policy_of_its_own_version():
    """Completion 0 sampled by version 3 throughout; completion 1 by 3 for two tokens and 4
    after (a sync landed in flight). Served logprobs equal to those policies token by token
    give a zero diff; the same logprobs with completion 1 labelled 3 throughout do not; the
    model keeps its own parameters after."""
    model = Policy()
    snapshots = PolicySnapshots(model, keep=2)
    with torch.no_grad():
        model.w.fill_(-1.0)
    snapshots.record(3)
    with torch.no_grad():
        model.w.fill_(-2.0)
    snapshots.record(4)
    with torch.no_grad():
        model.w.fill_(-9.0)  # the trainer's own, newer policy
    versions = torch.tensor([[3, 3, 3, 0], [3, 3, 4, 4]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    served = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [-1.0, -1.0, -2.0, -2.0]])

    health = snapshots.health(model.score, served, versions, mask)
    assert health == {"logprob_diff_mean": 0.0, "logprob_diff_max": 0.0, "logprob_diff_quantile": 0.0}
    one_version = torch.tensor([[3, 3, 3, 0], [3, 3, 3, 3]])
    health = snapshots.health(model.score, served, one_version, mask)
    assert health["logprob_diff_max"] == 1.0 and health["logprob_diff_mean"] == pytest.approx(2 / 7)
    assert torch.equal(model.w.detach(), torch.full((2, 4), -9.0))


def test_only_the_last_versions_are_kept_and_a_missing_one_is_named():
    model = Policy()
    snapshots = PolicySnapshots(model, keep=2)
    for v in range(4):
        snapshots.record(v)
    with pytest.raises(KeyError, match=r"no snapshot of weight version 1 \(kept: \[2, 3\]\)"):
        snapshots.health(model.score, torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
