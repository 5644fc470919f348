"""What a factor sync sends (sync/factors.py, `lora_records`), called directly on a plan: plain
LoRA goes as its factors in the engine's dtype, frozen tensors that only complete a fused group
do not go at all, and what has no factors (modules_to_save copies, DoRA, LoRA biases, trainable
tokens) goes whole; every record rebuilds merge_and_unload's tensor. No engine here: what a
`WeightSync` with strategy `factors` hands a receiver is in test_weight_sync.py.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorasync.served_model import checkpoint_layout, weight_groups
from lorasync.sync.factors import lora_records
from lorasync.sync.merge import Merger
from lorasync.sync.plan import plan_sync
from tests.helpers import PACKED, VARIANTS, peft_model


def records_for(model, model_dir, dtype=torch.float32):
    layout = checkpoint_layout(model_dir)
    plan = plan_sync(model, layout, weight_groups(layout, PACKED))
    return plan, list(lora_records(Merger(model, plan.adapter_name), plan, dtype))


def test_plain_lora_goes_as_its_factors_in_the_engine_dtype_and_frozen_group_members_stay(tiny_model):
    """LoRA on qwen2's q_proj: the changed plan is the whole q/k/v group (weights and biases),
    but only the two q_proj weights go, as the trainer's own B and A in bfloat16."""
    model_dir = tiny_model("qwen2")
    model = peft_model(model_dir, dict(target_modules=["q_proj"]))
    plan, records = records_for(model, model_dir, torch.bfloat16)
    assert len(plan.changed) == 12
    assert [r.name for r in records] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    for i, r in enumerate(records):
        layer = model.base_model.model.model.layers[i].self_attn.q_proj
        assert r.kind == "lora" and r.scale == layer.scaling["pol"]
        b, a = r.tensors
        assert b.dtype == a.dtype == torch.bfloat16
        assert torch.equal(b, layer.lora_B["pol"].weight.to(torch.bfloat16))
        assert torch.equal(a, layer.lora_A["pol"].weight.to(torch.bfloat16))


@pytest.mark.parametrize(
    "variant,whole,factors",
    [
        ("modules-to-save", {"lm_head.weight"}, 2),  # and v_proj's LoRA
        ("dora", {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}, 0),
        ("lora-bias", {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "qkv"}, 6),
        ("trainable-tokens", {"model.embed_tokens.weight"}, 2),  # and q_proj's LoRA
    ],
    ids=["modules-to-save", "dora", "lora-bias", "trainable-tokens"],
)
def test_what_has_no_factors_goes_whole_and_every_record_is_the_merged_tensor(tiny_model, variant, whole, factors):
    model_dir = tiny_model(VARIANTS[variant][0])
    model = peft_model(model_dir, VARIANTS[variant][1])
    _, records = records_for(model, model_dir)
    assert {r.name for r in records if r.kind == "full"} == whole
    assert sum(r.kind == "lora" for r in records) == factors
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for r in records:
        value = r.tensors[0] if r.kind == "full" else base[r.name] + r.scale * r.tensors[0] @ r.tensors[1]
        torch.testing.assert_close(value, expected[r.name], rtol=1e-5, atol=1e-6, msg=r.name)
