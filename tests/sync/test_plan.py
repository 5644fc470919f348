"""The sync plan (sync/plan.py): a changed-only sync completes each group the engine fuses
(q/k/v), a modules_to_save embedding tied to the lm_head is sent once, and on gemma3 and phi3
every served tensor is planned (and streamed as merge_and_unload has it); what no sync can serve
(LoRA on a tied embedding) is refused by name. No vLLM here; test_parity.py and
tests/server/client/test_engine.py run the same models on real engines.

- gemma3: sliding-window and full layers, q/k norms, a scaled embedding tied to the lm_head;
- phi3: q/k/v and gate/up fused in the checkpoint itself (`qkv_proj`, `gate_up_proj`), which
  vLLM loads as they are (its packed_modules_mapping maps each fused name to itself).
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorasync.served_model import checkpoint_layout, weight_groups
from lorasync.models.tiny import make_tiny_model
from lorasync.sync.merge import Merger
from lorasync.sync.plan import plan_sync
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import PACKED, MemoryReceiver, peft_model, train_step

# vLLM 0.32's packed_modules_mapping of Phi3ForCausalLM: the checkpoint is fused already.
PHI3_PACKED = {"qkv_proj": ["qkv_proj"], "gate_up_proj": ["gate_up_proj"]}
# (architecture, tied embeddings) of the models here; conftest's MODELS does not hold them.
ARCHS = {"gemma3": ("gemma3", True), "gemma3-untied": ("gemma3", False), "phi3": ("phi3", False)}


@pytest.fixture(scope="module")
def arch_model(tmp_path_factory):
    """arch_model(name) -> folder of a tiny model of ARCHS, built once for the module."""
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            arch, tied = ARCHS[name]
            built[name] = str(make_tiny_model(tmp_path_factory.mktemp(name), arch=arch, tie_word_embeddings=tied))
        return built[name]

    return get


def plan_for(model, model_dir):
    layout = checkpoint_layout(model_dir)
    packed = PHI3_PACKED if "phi3" in str(model_dir) else PACKED
    return plan_sync(model, layout, weight_groups(layout, packed)), layout


def test_plan_completes_fused_groups(tiny_model):
    model_dir = tiny_model("qwen2")
    model = peft_model(model_dir, dict(target_modules=["q_proj"]))
    layout = checkpoint_layout(model_dir)
    plan = plan_sync(model, layout, weight_groups(layout, PACKED))
    changed = {e.checkpoint for e in plan.changed}
    attn = "model.layers.{}.self_attn.{}_proj.{}"
    assert changed == {attn.format(i, p, t) for i in (0, 1) for p in "qkv" for t in ("weight", "bias")}
    assert len(plan.full) == len(layout)


def test_plan_sends_modules_to_save_whole_and_tied_embedding_once(tiny_model):
    model_dir = tiny_model("qwen2-tied")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        base, LoraConfig(target_modules=["o_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    )
    layout = checkpoint_layout(model_dir)
    assert "lm_head.weight" not in layout
    plan = plan_sync(model, layout, weight_groups(layout, PACKED))
    changed = [e.checkpoint for e in plan.changed]
    assert changed.count("model.embed_tokens.weight") == 1
    assert sorted(changed) == sorted(["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)])


@pytest.mark.parametrize(
    "name,config",
    [
        ("gemma3", dict(target_modules="all-linear", modules_to_save=["embed_tokens"], ensure_weight_tying=True)),
        ("gemma3", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])),
        ("gemma3-untied", dict(target_modules=["embed_tokens", "o_proj"])),  # PEFT scales the LoRA rows too
        ("phi3", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
        ("phi3", dict(target_modules=["qkv_proj"], use_dora=True)),
    ],
    ids=["gemma3-save-embed", "gemma3-tokens", "gemma3-untied-embedding-lora", "phi3-save-lm-head", "phi3-dora"],
)
def test_streamed_tensors_equal_merge_and_unload(arch_model, name, config):
    model_dir = arch_model(name)
    model = peft_model(model_dir, config)
    plan, layout = plan_for(model, model_dir)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    merger = Merger(model, plan.adapter_name)
    streamed = {e.checkpoint: merger(e) for e in plan.full}
    assert set(streamed) == set(layout)
    for ckpt, tensor in streamed.items():
        torch.testing.assert_close(tensor, expected[ckpt], rtol=1e-6, atol=1e-6, msg=ckpt)


def test_phi3_fused_projections_are_planned_and_sent_whole(arch_model):
    """LoRA on phi3's fused qkv_proj: the changed tensors are exactly the fused weights, each
    its own group, sent in the checkpoint's shape; a merged sync then serves the policy."""
    model_dir = arch_model("phi3")
    model = peft_model(model_dir, dict(target_modules=["qkv_proj"]))
    plan, layout = plan_for(model, model_dir)
    assert {e.checkpoint for e in plan.changed} == {f"model.layers.{i}.self_attn.qkv_proj.weight" for i in (0, 1)}
    assert layout["model.layers.0.self_attn.qkv_proj.weight"] == (128 + 2 * 64, 128)

    engine = MemoryReceiver(model_dir, packed=PHI3_PACKED)
    sync = WeightSync(model, engine)
    sync()
    train_step(model)
    assert sync().tensors_sent == 2
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for ckpt, tensor in engine.served().items():
        torch.testing.assert_close(tensor, merged[ckpt], rtol=1e-6, atol=1e-6, msg=ckpt)


@pytest.mark.parametrize(
    "name,arch,config",
    [
        ("gemma3", "Gemma3ForCausalLM", dict(target_modules=["embed_tokens", "q_proj"])),
        ("gemma3", "Gemma3ForCausalLM", dict(target_modules=["embed_tokens"], ensure_weight_tying=True)),
        ("qwen2-tied", "Qwen2ForCausalLM", dict(target_modules=["lm_head"])),
    ],
    ids=["gemma3", "gemma3-ensure-weight-tying", "qwen2-tied-lm-head"],
)
@pytest.mark.filterwarnings("ignore:Model has .tie_word_embeddings=True.:UserWarning")  # PEFT's, the same point
def test_lora_on_a_tied_embedding_is_refused_naming_the_architecture(arch_model, tiny_model, name, arch, config):
    """The trainer applies such LoRA per module, the tied engine serves one matrix for the
    embedding and the lm_head: on real vLLM a sync of LoRA on embed_tokens served logprobs off
    by 18 to 75 (tiny gemma3 and qwen2, tied). Refused before anything is sent, with the fix."""
    model_dir = arch_model(name) if name in ARCHS else tiny_model(name)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, **config))
    refusal = f"{arch} ties its lm_head .* LoRA on the tied weight .* Fix: .*modules_to_save"
    with pytest.raises(ValueError, match=refusal):
        WeightSync(model, MemoryReceiver(model_dir))
