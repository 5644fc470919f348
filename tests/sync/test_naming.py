"""PEFT -> checkpoint name rules: one test per rule, and a property test over generated names."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorasync.sync.naming import base_name, check_adapter_name, served_name

Q = "model.layers.0.self_attn.q_proj"


def test_strips_peft_prefix():
    assert served_name("base_model.model.model.norm.weight", "default") == "model.norm.weight"


def test_prefix_only_stripped_at_start():
    assert served_name("model.base_model.model.x.weight", "default") == "model.base_model.model.x.weight"


def test_strips_base_layer():
    assert served_name(f"base_model.model.{Q}.base_layer.weight", "default") == f"{Q}.weight"
    assert served_name(f"base_model.model.{Q}.base_layer.bias", "default") == f"{Q}.bias"


def test_skips_lora_tensors():
    for tensor in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        assert served_name(f"base_model.model.{Q}.{tensor}.default.weight", "default") is None


def test_skips_original_module():
    name = "base_model.model.lm_head.original_module.weight"
    assert served_name(name, "default") is None


def test_unwraps_modules_to_save_for_any_adapter_name():
    for adapter in ("default", "policy", "my_adapter2"):
        name = f"base_model.model.lm_head.modules_to_save.{adapter}.weight"
        assert served_name(name, adapter) == "lm_head.weight"


def test_skips_other_adapters_modules_to_save():
    name = "base_model.model.lm_head.modules_to_save.other.weight"
    assert served_name(name, "policy") is None


def test_strips_fsdp_and_checkpoint_wrappers():
    name = "_fsdp_wrapped_module.base_model.model.model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.base_layer.weight"
    assert served_name(name, "default") == f"{Q}.weight"


def test_base_name_maps_frozen_weights_and_skips_adapter_tensors():
    assert base_name("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert base_name(f"base_model.model.{Q}.base_layer.weight") == f"{Q}.weight"
    assert base_name("base_model.model.lm_head.modules_to_save.default.weight") is None
    assert base_name(f"base_model.model.{Q}.lora_A.default.weight") is None


segment = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True).filter(
    lambda s: not s.startswith("lora_")
    and s not in {"base_layer", "original_module", "modules_to_save"}
    and not s.startswith("_")
)
checkpoint_names = st.builds(
    lambda parts, leaf: ".".join(parts + [leaf]),
    st.lists(st.one_of(segment, st.integers(0, 99).map(str)), min_size=1, max_size=5),
    st.sampled_from(["weight", "bias"]),
)
adapters = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)


@given(checkpoint_names, adapters, st.booleans(), st.booleans())
def test_round_trip_over_generated_names(name, adapter, fsdp, ckpt_wrapped):
    """Every way PEFT and torch decorate a name maps back to it, or is skipped."""
    module, leaf = name.rsplit(".", 1)

    def wrap(n: str) -> str:
        n = "base_model.model." + n
        if ckpt_wrapped:
            head, tail = n.rsplit(".", 1)
            n = f"{head}._checkpoint_wrapped_module.{tail}" if "." in head else n
        return ("_fsdp_wrapped_module." if fsdp else "") + n

    assert served_name(wrap(name), adapter) == name
    assert served_name(wrap(f"{module}.base_layer.{leaf}"), adapter) == name
    assert served_name(wrap(f"{module}.modules_to_save.{adapter}.{leaf}"), adapter) == name
    assert served_name(wrap(f"{module}.modules_to_save.{adapter}x.{leaf}"), adapter) is None
    assert served_name(wrap(f"{module}.original_module.{leaf}"), adapter) is None
    assert served_name(wrap(f"{module}.lora_A.{adapter}.weight"), adapter) is None
    assert base_name(wrap(f"{module}.original_module.{leaf}")) == name


def test_trainable_tokens_unwrap_and_skip_delta():
    name = "base_model.model.model.embed_tokens.token_adapter.base_layer.weight"
    assert served_name(name, "default") == "model.embed_tokens.weight"
    delta = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    assert served_name(delta, "default") is None
    assert base_name(delta) is None


@pytest.mark.parametrize("name", ["default", "policy", "pol_2", "a-b", "X" * 64])
def test_adapter_names_that_are_safe_folder_names_pass(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../etc", "a/b", "a.b", "a b", "x" * 65, "é", "a\n", None])
def test_adapter_names_that_could_leave_their_folder_are_refused(name):
    with pytest.raises(ValueError, match="letters, digits"):
        check_adapter_name(name)


def test_the_engine_checks_the_name_before_it_becomes_a_path():
    from lorasync.engines.colocated import ColocatedEngine

    engine = object.__new__(ColocatedEngine)  # the check comes first: no vLLM needed
    with pytest.raises(ValueError, match="got '../x'"):
        engine.load_adapter({}, {"r": 8}, name="../x")
