"""Loading and making adapters: PEFT's folder layout, and clear errors for bad input."""

import pytest
from peft import IA3Config, get_peft_model
from transformers import AutoModelForCausalLM

from lorasync.models.tiny import TinyShape, make_tiny_model
from lorasync.sync.policy import AdapterSpec, load_policy, make_random_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("base"), arch="llama"))


@pytest.mark.parametrize("name", ["default", "policy"])
def test_round_trip_keeps_name_and_weights(base, tmp_path, name):
    spec = AdapterSpec(targets=["q_proj", "v_proj"], rank=4, modules_to_save=["lm_head"], adapter_name=name)
    make_random_adapter(base, tmp_path, spec)
    model = load_policy(base, tmp_path)
    assert model.active_adapter == name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 and p.requires_grad for p in lora_b)
    assert any(f"modules_to_save.{name}" in n for n, _ in model.named_parameters())


def test_missing_adapter_folder(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(base, tmp_path / "nope")


def test_folder_without_adapter_config(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_policy(base, tmp_path)


def test_missing_base_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_policy(tmp_path / "nobase", tmp_path)


def test_adapter_for_another_base(base, tmp_path):
    other = make_tiny_model(tmp_path / "other", arch="llama", shape=TinyShape(hidden_size=256))
    make_random_adapter(other, tmp_path / "adapter", AdapterSpec(targets=["q_proj"]))
    with pytest.raises(ValueError, match="does not fit base model"):
        load_policy(base, tmp_path / "adapter")


def test_non_lora_adapter(base, tmp_path):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="LoRA adapters only"):
        load_policy(base, tmp_path)


def test_spec_validation():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        AdapterSpec(rank=0)
    with pytest.raises(ValueError, match="AdapterSpec.adapter_name must be 1-64 letters"):
        AdapterSpec(adapter_name="a.b")
