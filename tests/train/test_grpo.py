"""GRPO arithmetic: advantages and the loss, checked against hand-computed values."""

import pytest
import torch

from lorasync.train.grpo import group_advantages, grpo_loss


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert torch.all(adv[4:] == 0)  # a group of equal rewards teaches nothing


def test_group_advantages_refuse_a_ragged_batch():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_loss_is_minus_advantage_weighted_logprob_and_masks_padding():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    parts = grpo_loss(logprobs, logprobs.detach(), logprobs.detach(), adv, mask, 0.2, 2.0)
    assert parts.loss.item() == pytest.approx(-(1 + 1 - 1) / 3)  # ratio 1 on 3 real tokens
    parts.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))


def test_importance_weight_is_truncated_at_the_cap():
    lp = torch.zeros(1, 2, requires_grad=True)
    engine = torch.tensor([[-5.0, 0.0]])  # the engine found token 0 far less likely
    parts = grpo_loss(lp, lp.detach(), engine, torch.tensor([1.0]), torch.ones(1, 2), 0.2, is_cap=2.0)
    assert parts.is_weight_mean == pytest.approx((2.0 + 1.0) / 2)


def test_clip_stops_the_gradient_outside_the_trust_region():
    lp = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 > 1.2 with old = 0
    parts = grpo_loss(lp, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, 2.0)
    parts.loss.backward()
    assert parts.clip_fraction == 1.0 and lp.grad.item() == 0.0


def test_kl_needs_the_reference_and_is_zero_at_the_reference():
    lp = torch.tensor([[-1.0, -2.0]])
    args = (lp, lp, lp, torch.tensor([0.0]), torch.ones(1, 2), 0.2, 2.0)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(*args, beta=0.1)
    assert grpo_loss(*args, beta=0.1, ref_logprobs=lp).kl == 0.0
    assert grpo_loss(*args, beta=0.1, ref_logprobs=lp - 1).kl > 0


def test_the_mask_leaves_out_tokens_whose_weight_is_outside_the_band():
    """is_mask: a token the engine found far less likely (weight e^5 > cap) or far more likely
    (e^-5 < 1/cap) than the trainer does is left out, the others kept and truncated as usual."""
    lp = torch.zeros(1, 4, requires_grad=True)
    engine = torch.tensor([[-5.0, 5.0, 0.0, -0.5]])
    adv = torch.tensor([1.0])
    kept = grpo_loss(lp, lp.detach(), engine, adv, torch.ones(1, 4), 0.2, is_cap=2.0, is_mask=True)
    assert kept.masked_fraction == 0.5
    assert kept.is_weight_max == pytest.approx(torch.e ** 5) and kept.is_weight_min == pytest.approx(torch.e ** -5)
    assert kept.is_weight_mean == pytest.approx((1.0 + torch.e ** 0.5) / 2)
    kept.loss.backward()
    assert lp.grad[0, :2].abs().sum() == 0 and lp.grad[0, 2:].abs().min() > 0
    plain = grpo_loss(lp, lp.detach(), engine, adv, torch.ones(1, 4), 0.2, is_cap=2.0)
    assert plain.masked_fraction == 0 and plain.is_weight_mean == pytest.approx((2.0 + torch.e ** -5 + 1.0 + torch.e ** 0.5) / 4)
