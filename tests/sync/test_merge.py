"""The streaming merge equals PEFT's own merge_and_unload, for every LoRA variant PEFT offers,
and never touches the trainer model. No vLLM here: the claim is about the trainer side."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorasync.served_model import checkpoint_layout, weight_groups
from lorasync.sync.merge import Merger
from lorasync.sync.merge_kernel import Kernel
from lorasync.sync.plan import plan_sync
from lorasync.sync.policy import randomize_trainable
from tests.helpers import PACKED, VARIANTS, peft_model


@pytest.mark.parametrize("kernel", list(Kernel))
@pytest.mark.parametrize("variant", VARIANTS)
def test_streamed_tensors_equal_merge_and_unload(tiny_model, variant, kernel):
    model_dir = tiny_model(VARIANTS[variant][0])
    model = peft_model(model_dir, VARIANTS[variant][1], extra_adapter=variant == "plain")
    layout = checkpoint_layout(model_dir)
    plan = plan_sync(model, layout, weight_groups(layout, PACKED))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()

    merger = Merger(model, plan.adapter_name, kernel)
    streamed = {e.checkpoint: merger(e) for e in plan.full}

    assert set(streamed) == set(layout)
    for name, tensor in streamed.items():  # float32: equal up to rounding order
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert any(not torch.equal(streamed[n], AutoModelForCausalLM.from_pretrained(model_dir).state_dict()[n])
               for n in streamed)  # the adapter does change something
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def bf16_llama(model_dir):
    """A bf16 llama with a random all-linear adapter, and its sync plan."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    randomize_trainable(model, seed=0, std=0.05)
    layout = checkpoint_layout(model_dir)
    return model, plan_sync(model, layout, weight_groups(layout, PACKED))


def test_base_weights_bit_identical_after_many_streamed_merges_in_bf16(tiny_model):
    model, plan = bf16_llama(tiny_model("llama"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merger = Merger(model, plan.adapter_name)
    for _ in range(50):
        for entry in plan.changed:
            merger(entry)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("kernel", list(Kernel))
def test_fused_merge_matches_peft_in_bfloat16_to_one_rounding(tiny_model, kernel):
    """In bf16 the fused addmm rounds the factors and the result once each, the blocked kernel
    only the result; PEFT rounds the delta and the sum. They agree to one bf16 rounding of the
    weight plus one of the delta."""
    model_dir = tiny_model("llama")
    model, plan = bf16_llama(model_dir)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    eps = torch.finfo(torch.bfloat16).eps
    merger = Merger(model, plan.adapter_name, kernel)
    for entry in plan.full:
        got = merger(entry).float()
        want = expected[entry.checkpoint].float()
        delta = (want - original[entry.checkpoint].float()).abs().max()
        assert ((got - want).abs() <= eps * (want.abs() + delta)).all(), entry.checkpoint
