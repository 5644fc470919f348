"""After a sync, real vLLM serves the trainer's policy: per-token logprobs match in float32."""

import pytest
from safetensors import safe_open

from lorasync.models.tiny import make_tiny_model
from lorasync.sync.merged_weight import MergedWeight
from lorasync.sync.verify import TOLERANCES, probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import TRAINED_TOKENS, VARIANTS, peft_model, policy, train_step

pytestmark = pytest.mark.vllm
# The merged strategies a colocated engine takes (`adapter` and `auto`: test_adapter.py).
STRATEGIES = ["streaming", "merge-unmerge"]

ADAPTERS = {
    "all-linear": dict(targets=["all-linear"]),
    "q-v-only": dict(targets=["q_proj", "v_proj"]),
    "save-embed": dict(targets=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    "save-lm-head": dict(targets=["all-linear"], modules_to_save=["lm_head"]),
}


CASES = [
    (model, adapter)
    for model in ("qwen2-tied", "llama", "qwen3")
    for adapter in ADAPTERS
    # A tied model has no separate lm_head to train; its embedding case covers both.
    if not (model == "qwen2-tied" and adapter == "save-lm-head")
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model_name,adapter", CASES)
def test_parity_after_sync_float32(tiny_model, engine_for, model_name, adapter, strategy):
    model_dir = tiny_model(model_name)
    trainer = policy(model_dir, adapter_name="policy_v1", **ADAPTERS[adapter])
    check_two_syncs(engine_for(model_dir), trainer, strategy)


def check_two_syncs(engine, trainer, strategy: str) -> None:
    """Parity in float32 after a first sync and after one more training step, and what each
    sync sent: merged, everything first and then only the changed groups (streaming) or
    everything again (merge-unmerge); adapter, the LoRA factors each time."""
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine, strategy=strategy)
    factors = sum(1 for n, p in trainer.named_parameters() if p.requires_grad and ".lora_" in n)

    report = sync()  # the first sync sends everything

    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    assert report.version == engine.weight_version
    assert report.tensors_sent == (factors if strategy == "adapter" else len(engine.checkpoint_layout()))

    train_step(trainer)
    report = sync()  # later ones only what the adapter changes (streaming)

    result = verify(trainer, engine, probes)
    assert result.max_abs_diff <= 1e-4, result
    expected = {"streaming": len(sync.plan.changed), "merge-unmerge": len(sync.plan.full), "adapter": factors}
    assert report.tensors_sent == expected[strategy]
    # The adapter moved the policy far from the base: parity is not trivially true.
    with trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-2


# gemma3: sliding-window and full-attention layers, q/k norms, a scaled embedding tied to the
# lm_head; phi3: q/k/v and gate/up fused in the checkpoint itself (qkv_proj, gate_up_proj).
# Each runs every colocated strategy on one engine with vLLM's LoRA enabled (the adapter
# strategy needs it; the merged ones run on it too), one engine per architecture for the module.
ARCH_ADAPTERS = {
    "gemma3": {
        "all-linear": dict(targets=["all-linear"]),
        "q-v-only": dict(targets=["q_proj", "v_proj"]),
        "save-embed": dict(targets=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    },
    "phi3": {
        "all-linear": dict(targets=["all-linear"]),
        "fused-only": dict(targets=["qkv_proj", "gate_up_proj"]),
        "save-lm-head": dict(targets=["qkv_proj"], modules_to_save=["lm_head"]),
    },
}
ARCH_TIED = {"gemma3": True, "phi3": False}
ARCH_CASES = [
    (arch, adapter, strategy)
    for arch, adapters in ARCH_ADAPTERS.items()
    for adapter, spec in adapters.items()
    for strategy in (*STRATEGIES, "adapter")
    # vLLM's LoRA serves factors on linear layers only (check_servable refuses the rest)
    if not (strategy == "adapter" and spec.get("modules_to_save"))
]


@pytest.fixture(scope="module")
def arch_engine(tmp_path_factory):
    """arch_engine(arch) -> (LoRA-enabled engine, model folder) of a tiny model of ARCH_TIED,
    built once for the module and serving the checkpoint's weights when handed out."""
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig

    engines = {}

    def get(arch: str):
        if arch not in engines:
            out = tmp_path_factory.mktemp(arch)
            model_dir = str(make_tiny_model(out, arch=arch, tie_word_embeddings=ARCH_TIED[arch]))
            engines[arch] = ColocatedEngine(EngineConfig(model=model_dir, enable_lora=True)), model_dir
        engine, model_dir = engines[arch]
        # The adapter strategy serves on the checkpoint's weights: undo earlier merged syncs.
        with safe_open(f"{model_dir}/model.safetensors", framework="pt") as f:
            engine.load_weights((name, f.get_tensor(name)) for name in f.keys())
        return engine, model_dir

    yield get
    for engine, _ in engines.values():
        engine.close()


@pytest.mark.parametrize("arch,adapter,strategy", ARCH_CASES)
def test_parity_after_sync_float32_gemma3_phi3(arch_engine, arch, adapter, strategy):
    engine, model_dir = arch_engine(arch)
    trainer = policy(model_dir, adapter_name="policy_v1", **ARCH_ADAPTERS[arch][adapter])
    check_two_syncs(engine, trainer, strategy)


@pytest.mark.parametrize("model_name", ["qwen2", "qwen2-tied"])
def test_parity_default_strategy_bfloat16(tiny_model, engine_for, model_name):
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir, "bfloat16")
    trainer = policy(model_dir, dtype="bfloat16", adapter_name="pol", modules_to_save=["embed_tokens"])
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine)
    sync()
    train_step(trainer)
    sync()
    assert verify(trainer, engine, probes).max_abs_diff <= TOLERANCES["bfloat16"]


def with_trained_tokens(probes: list[list[int]]) -> list[list[int]]:
    """The probes with the trainable-token variants' trained ids written in at every third
    position: read as inputs (their embedding rows) and scored as targets (a tied lm_head's
    rows). Random probes may hold none of them, and then a wrong token merge goes unseen."""
    return [
        [TRAINED_TOKENS[i // 3 % len(TRAINED_TOKENS)] if i % 3 == 1 else t for i, t in enumerate(p)]
        for p in probes
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_for_every_lora_variant(tiny_model, engine_for, variant):
    """The default strategy on real vLLM, for each LoRA variant PEFT offers (float32)."""
    model_name, config = VARIANTS[variant]
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir)
    trainer = peft_model(model_dir, config, extra_adapter=variant == "plain")
    probes = with_trained_tokens(probe_sequences(engine.vocab_size))
    assert all(set(TRAINED_TOKENS) <= set(p) for p in probes)
    sync = WeightSync(trainer, engine)
    sync()
    train_step(trainer)
    sync()
    result = verify(trainer, engine, probes)
    assert result.max_abs_diff <= 1e-4, result
    with trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-3


@pytest.mark.parametrize("model_name", ["qwen2", "gpt2"])
def test_streaming_merges_straight_into_vllm_parameters(tiny_model, engine_for, model_name, monkeypatch):
    """vLLM's loaders copy each merged weight into their own parameter, so the merge is written
    there in place: not one merged tensor is materialized on the way (the speed of a changed-only
    sync rests on it). A vLLM loader that reads the value otherwise shows up here, not as a slowdown."""
    materialized = []
    original = MergedWeight.materialize
    monkeypatch.setattr(MergedWeight, "materialize", lambda self: materialized.append(1) or original(self))
    model_dir = tiny_model(model_name)
    engine = engine_for(model_dir, "bfloat16")
    trainer = policy(model_dir, dtype="bfloat16", adapter_name="pol")
    sync = WeightSync(trainer, engine)
    sync()
    train_step(trainer)
    sync()
    assert verify(trainer, engine, probe_sequences(engine.vocab_size)).max_abs_diff <= TOLERANCES["bfloat16"]
    assert materialized == []
