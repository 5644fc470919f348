"""WeightSync without vLLM: which engine takes which strategy (refused before anything is sent,
with the fix), and what each strategy hands an in-memory receiver. The fast tier's cover of
the sync; test_parity.py shows the same on real vLLM."""

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lorasync.engines.colocated import EngineConfig
from lorasync.sync.base import AdapterReceiver, Record, RecordReceiver, Strategy, WeightReceiver
from lorasync.sync.weight_sync import WeightSync, check_engine
from tests.helpers import MemoryReceiver, Tap, mixed_precision_policy, peft_model, policy, train_step


class AdapterMemory(MemoryReceiver):
    """A MemoryReceiver that also serves adapters (an `AdapterReceiver`), up to `max_lora_rank`."""

    def __init__(self, model_dir, max_lora_rank: int = 16, **kwargs) -> None:
        super().__init__(model_dir, **kwargs)
        self.max_lora_rank = max_lora_rank
        self.adapters: list[tuple[dict, dict, str]] = []

    def load_adapter(self, tensors, config, name="policy") -> int:
        self.adapters.append(({k: t.clone() for k, t in tensors.items()}, dict(config), name))
        self.weight_version += 1
        return self.weight_version

    def decode_seconds_per_token(self, prompts, max_tokens, use_adapter) -> float:
        return 0.002 if use_adapter else 0.001


class RecordMemory(MemoryReceiver):
    """A MemoryReceiver that also takes factor records (a `RecordReceiver`), and keeps them."""

    merge_kernel = "addmm"  # as a server names its kernel (never runs here)

    def __init__(self, model_dir, **kwargs) -> None:
        super().__init__(model_dir, **kwargs)
        self.records: list[list[Record]] = []

    def load_records(self, records) -> int:
        self.records.append(list(records))
        self.weight_version += 1
        return self.weight_version


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- the fakes are what the sync's Protocols say ---------------------------------------------


def test_the_fakes_implement_the_receiver_protocols(tiny_model):
    model_dir = tiny_model("qwen2")
    memory, adapters, records = MemoryReceiver(model_dir), AdapterMemory(model_dir), RecordMemory(model_dir)
    assert isinstance(memory, WeightReceiver) and isinstance(Tap(memory, iter), WeightReceiver)
    assert not isinstance(memory, (AdapterReceiver, RecordReceiver))
    assert isinstance(adapters, AdapterReceiver) and not isinstance(adapters, RecordReceiver)
    assert isinstance(records, RecordReceiver) and not isinstance(records, AdapterReceiver)
    assert memory.vocab_size == 512 and memory.weight_version == 0 and memory.dtype == torch.float32


def test_memory_receiver_refuses_what_vllm_would_not_take(tiny_model):
    engine = MemoryReceiver(tiny_model("qwen2"))
    q = "model.layers.0.self_attn.q_proj.weight"
    shape = engine.checkpoint_layout()[q]
    with pytest.raises(ValueError, match="partial fused group"):
        engine.load_weights([(q, torch.zeros(shape))])
    with pytest.raises(ValueError, match="not a tensor of the checkpoint"):
        engine.load_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="bfloat16"):
        engine.load_weights([("model.norm.weight", torch.zeros(128, dtype=torch.bfloat16))])
    assert engine.loads == 0 and engine.weight_version == 0


# --- strategies by name (Strategy.parse itself: test_base.py) -------------------------------


def test_auto_needs_tokens_per_step_and_only_auto_takes_it():
    with pytest.raises(ValueError, match="tokens_per_step"):
        WeightSync(None, None, strategy="auto")
    with pytest.raises(ValueError, match="tokens_per_step"):
        WeightSync(None, None, strategy="adapter", tokens_per_step=10)


# --- which engine takes which strategy: check_engine (the table by kind: test_kinds.py) ------


def test_factors_are_refused_on_an_engine_that_does_not_merge_them(tiny_model):
    model_dir = tiny_model("qwen2")
    engine, trainer = MemoryReceiver(model_dir), policy(model_dir)
    with pytest.raises(ValueError, match=r"strategy 'factors' .* the engine is a MemoryReceiver, which "
                                         r"does not merge factors: use a ServerEngine .* or strategy "
                                         r"'streaming' on this engine"):
        WeightSync(trainer, engine, "factors")
    assert engine.loads == 0


@pytest.mark.parametrize("strategy", ["adapter", "auto"])
def test_adapter_strategies_are_refused_on_an_engine_without_lora(tiny_model, strategy):
    model_dir = tiny_model("qwen2")
    trainer = policy(model_dir, rank=8)
    tokens = 100 if strategy == "auto" else None
    with pytest.raises(ValueError, match=f"strategy '{strategy}' needs an engine that serves LoRA "
                                         "adapters .* use a colocated engine"):
        WeightSync(trainer, MemoryReceiver(model_dir), strategy, tokens)
    engine = AdapterMemory(model_dir, max_lora_rank=0)  # a colocated engine built without LoRA
    with pytest.raises(ValueError, match=r"adapter rank 8 exceeds the engine's max_lora_rank 0 \(0: built "
                                         r"without LoRA support\): build the engine with "
                                         r"EngineConfig\(enable_lora=True, max_lora_rank=8\)"):
        WeightSync(trainer, engine, strategy, tokens)
    assert engine.loads == 0 and engine.adapters == []
    WeightSync(trainer, AdapterMemory(model_dir, max_lora_rank=8), strategy, tokens)  # rank 8 fits


def test_an_adapter_vllm_cannot_serve_is_refused_before_anything_is_sent(tiny_model):
    model_dir = tiny_model("llama")
    engine = AdapterMemory(model_dir)
    trainer = peft_model(model_dir, dict(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="cannot serve adapter 'pol': it uses DoRA.*strategy='streaming'"):
        WeightSync(trainer, engine, "adapter")
    assert engine.adapters == []
    check_engine(Strategy.STREAMING, engine, trainer)  # the fix the message names


def test_engine_from_another_model_is_refused_and_nothing_changes(tiny_model):
    engine = MemoryReceiver(tiny_model("qwen3"))
    trainer = policy(tiny_model("llama"), adapter_name="pol")
    before = params(trainer)
    with pytest.raises(ValueError, match="not the trainer's base model: 4 engine weights the trainer lacks"):
        WeightSync(trainer, engine)
    assert engine.loads == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.named_parameters())


def test_untied_lm_head_on_tied_engine_is_refused(tiny_model):
    model_dir = tiny_model("qwen2-tied")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = get_peft_model(base, LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        WeightSync(trainer, MemoryReceiver(model_dir))


def test_non_lora_adapter_is_refused(tiny_model):
    model_dir = tiny_model("llama")
    trainer = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    with pytest.raises(TypeError, match="LoRA adapters only"):
        WeightSync(trainer, MemoryReceiver(model_dir))


def test_engine_config_is_checked_before_vllm_is_asked(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2")
    with pytest.raises(ValueError, match="EngineConfig.dtype must be one of float32, bfloat16, float16"):
        EngineConfig(model=model_dir, dtype="int8")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EngineConfig(model=str(tmp_path))
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        EngineConfig(model=model_dir, max_model_len=1)
    with pytest.raises(ValueError, match="max_lora_rank must be >= 1"):
        EngineConfig(model=model_dir, max_lora_rank=0)


# --- what each strategy sends -----------------------------------------------------------------


def test_streaming_sends_everything_first_then_only_the_changed_groups(tiny_model):
    model_dir = tiny_model("qwen2")
    engine = MemoryReceiver(model_dir)
    trainer = policy(model_dir, targets=["q_proj"])
    sync = WeightSync(trainer, engine)
    layout = engine.checkpoint_layout()

    first = sync()
    assert engine.received[0] == [name for group in engine.weight_groups() for name in group]
    assert (first.strategy, first.tensors_sent, first.version) == ("streaming", len(layout), 1)
    assert first.bytes_sent == nbytes(engine.tensors.values()) == 4 * sum(
        torch.Size(s).numel() for s in layout.values()
    )

    before = params(trainer)
    for _ in range(2):
        train_step(trainer)
        # the policy as trained, taken before the sync: what the engine must serve, and what
        # the trainer must still hold after it (the sync only reads the model)
        trained = params(trainer)
        expected = copy.deepcopy(trainer).merge_and_unload().state_dict()
        report = sync()
        after = params(trainer)
        assert [n for n in trained if not torch.equal(after[n], trained[n])] == [], "the sync changed the trainer"
        # q_proj is fused with k and v: the whole group goes, weights and biases
        assert sorted(engine.received[-1]) == sorted(
            f"model.layers.{i}.self_attn.{p}_proj.{t}" for i in (0, 1) for p in "qkv" for t in ("weight", "bias")
        )
        assert report.tensors_sent == 12 and report.bytes_sent == nbytes(
            engine.tensors[n] for n in engine.received[-1]
        )
    assert report.version == engine.weight_version == 3
    # the engine serves exactly the trainer's merged policy, as it was before the sync
    served = engine.served()
    assert set(served) == set(layout)
    for name in layout:
        torch.testing.assert_close(served[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert all(not torch.equal(before[n], trained[n]) for n in before if "lora_" in n)
    assert all(torch.equal(trained[n], p) for n, p in trainer.named_parameters())


def test_merge_unmerge_sends_every_tensor_every_time(tiny_model):
    model_dir = tiny_model("llama")
    engine = MemoryReceiver(model_dir)
    trainer = policy(model_dir, targets=["q_proj", "v_proj"])
    sync = WeightSync(trainer, engine, "merge-unmerge")
    for _ in range(3):
        report = sync()
        train_step(trainer)
        assert sorted(engine.received[-1]) == sorted(engine.checkpoint_layout())
        assert report.tensors_sent == len(engine.checkpoint_layout())
    assert engine.loads == 3
    assert not any(getattr(m, "merged", False) for m in trainer.modules())  # unmerged after each


def test_tensors_are_sent_in_the_engine_dtype(tiny_model):
    """float32 LoRA factors over a bfloat16 base arrive in the engine's bfloat16 (the receiver
    refuses any other dtype)."""
    model_dir = tiny_model("qwen2")
    engine = MemoryReceiver(model_dir, dtype="bfloat16")
    trainer = mixed_precision_policy(model_dir)
    for strategy in ("streaming", "merge-unmerge"):
        report = WeightSync(trainer, engine, strategy)()
        assert report.bytes_sent == 2 * sum(torch.Size(s).numel() for s in engine.checkpoint_layout().values())
    assert {t.dtype for t in engine.tensors.values()} == {torch.bfloat16}


def test_factors_send_lora_factors_and_saved_modules_whole(tiny_model):
    model_dir = tiny_model("qwen2")
    engine = RecordMemory(model_dir)
    trainer = policy(model_dir, targets=["all-linear"], modules_to_save=["lm_head"])
    sync = WeightSync(trainer, engine, "factors")
    train_step(trainer)
    report = sync()
    (records,) = engine.records
    kinds = {r.name: r.kind for r in records}
    assert kinds.pop("lm_head.weight") == "full"
    assert set(kinds.values()) == {"lora"} and len(kinds) == 2 * 7  # every linear of 2 layers
    assert report.tensors_sent == sum(len(r.tensors) for r in records)
    assert report.bytes_sent == sum(r.nbytes for r in records)
    layout = engine.checkpoint_layout()
    merged_bytes = 4 * sum(torch.Size(layout[e.checkpoint]).numel() for e in sync.plan.changed)
    lm_head_bytes = 4 * torch.Size(layout["lm_head.weight"]).numel()
    assert report.bytes_sent - lm_head_bytes < 0.2 * (merged_bytes - lm_head_bytes)
    # B, A and the scale are the merged weight: W + scale * B @ A
    expected = copy.deepcopy(trainer).merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for r in records:
        value = r.tensors[0] if r.scale is None else base[r.name] + r.scale * r.tensors[0] @ r.tensors[1]
        torch.testing.assert_close(value, expected[r.name], rtol=1e-5, atol=1e-6, msg=r.name)


def test_factors_of_gpt2_conv1d_come_in_the_checkpoint_orientation(tiny_model):
    model_dir = tiny_model("gpt2")
    engine = RecordMemory(model_dir)
    trainer = policy(model_dir, targets=["c_attn", "c_fc"])
    WeightSync(trainer, engine, "factors")()
    expected = copy.deepcopy(trainer).merge_and_unload().state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    lora = [r for r in engine.records[0] if r.kind == "lora"]
    assert len(lora) == 4
    for r in lora:
        b, a = r.tensors
        torch.testing.assert_close(base[r.name] + r.scale * b @ a, expected[r.name], rtol=1e-5, atol=1e-6)


def test_adapter_sends_the_peft_factors_in_the_engine_dtype(tiny_model):
    model_dir = tiny_model("qwen2")
    engine = AdapterMemory(model_dir, dtype="bfloat16")
    trainer = policy(model_dir, targets=["q_proj", "v_proj"], rank=4, adapter_name="pol")
    report = WeightSync(trainer, engine, "adapter")()
    ((tensors, config, name),) = engine.adapters
    lora = [p for n, p in trainer.named_parameters() if "lora_" in n]
    assert name == "pol" and config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert len(tensors) == report.tensors_sent == len(lora) == 2 * 2 * 2
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert report.bytes_sent == nbytes(lora) // 2 and engine.loads == 0
