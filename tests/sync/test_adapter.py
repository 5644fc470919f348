"""The `adapter` strategy (vLLM's own LoRA support), and `auto` measuring and choosing between it
and merging on a real engine (its decision with injected numbers: test_auto.py).

The refusals run without vLLM; the rest use one real engine with LoRA enabled, reset to the
checkpoint's weights before each test.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open

from lorasync.sync import auto
from lorasync.sync.adapter import check_servable
from lorasync.sync.auto import Measurements, choose_strategy
from lorasync.sync.policy import AdapterSpec, make_random_adapter
from lorasync.sync.verify import probe_sequences, trainer_scores, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import VARIANTS, peft_model, policy, run_lorasync, train_step

# --- what vLLM's LoRA cannot serve is refused, with the fix ----------------------------


@pytest.mark.parametrize(
    "variant", ["dora", "lora-bias", "modules-to-save", "trainable-tokens", "embedding-lora"]
)
def test_adapters_vllm_cannot_serve_are_refused(tiny_model, variant):
    model_name, config = VARIANTS[variant]
    model = peft_model(tiny_model(model_name), config)
    with pytest.raises(ValueError, match="vLLM's LoRA support cannot serve.*strategy='streaming'"):
        check_servable(model)


def test_rslora_is_servable(tiny_model):
    model_name, config = VARIANTS["rslora"]
    assert check_servable(peft_model(tiny_model(model_name), config))[0] == "pol"


# --- real vLLM ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _lora_engine(tiny_model):
    from lorasync.engines.colocated import ColocatedEngine, EngineConfig

    model_dir = tiny_model("qwen2-tied")
    engine = ColocatedEngine(EngineConfig(model=model_dir, enable_lora=True))
    yield engine, model_dir
    engine.close()


@pytest.fixture
def lora_engine(_lora_engine):
    """The shared LoRA engine with the checkpoint's weights (a merged sync may have run), and
    its model folder."""
    engine, model_dir = _lora_engine
    with safe_open(f"{model_dir}/model.safetensors", framework="pt") as f:
        engine.load_weights((name, f.get_tensor(name)) for name in f.keys())
    return engine, model_dir


@pytest.mark.vllm
def test_adapter_parity_after_two_syncs_and_old_adapters_removed(lora_engine):
    engine, model_dir = lora_engine
    trainer = policy(model_dir, adapter_name="policy_v1", targets=["all-linear"])
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine, strategy="adapter")

    first = sync()
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    old = engine.adapter
    assert old.lora_name == f"policy_v1-v{first.version}" and old.lora_int_id == first.version

    train_step(trainer)
    second = sync()

    result = verify(trainer, engine, probes)
    assert result.max_abs_diff <= 1e-4, result
    lora_params = [p for n, p in trainer.named_parameters() if "lora_" in n]
    assert second.tensors_sent == len(lora_params)
    assert second.bytes_sent == sum(p.numel() * p.element_size() for p in lora_params)
    # A new name and id per version; the old adapter is gone from vLLM and from tmpfs.
    current = engine.adapter
    assert current.lora_name == f"policy_v1-v{second.version}"
    assert current.lora_int_id == second.version
    assert engine.llm.llm_engine.list_loras() == {second.version}
    assert not os.path.exists(old.lora_path)
    # The adapter moved the policy far from the base: parity is not trivially true.
    with trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-2


@pytest.mark.vllm
def test_prefix_cache_never_serves_the_old_adapter(lora_engine):
    """Cached blocks of adapter v1 are reused for v1, and never for v2 (a new name and path)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine, model_dir = lora_engine
    trainer = policy(model_dir, adapter_name="policy_v1", targets=["all-linear"])
    sync = WeightSync(trainer, engine, strategy="adapter")
    # Longer than two of the CPU backend's 128-token blocks, so whole blocks get cached.
    prompt = probe_sequences(engine.vocab_size, n=1, length=300, seed=3)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0)

    def first_token():
        out = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False,
            lora_request=engine.adapter,
        )[0]
        token = out.outputs[0].token_ids[0]
        return out.num_cached_tokens, token, out.outputs[0].logprobs[0][token].logprob

    def trainer_logprob(token):
        return trainer_scores(trainer, [prompt + [token]])[0][-1]

    sync()
    first_token()
    cached, token, logprob = first_token()
    assert cached >= 256  # the cache works, and would serve v1's blocks
    train_step(trainer)
    sync()
    cached, token, logprob = first_token()
    assert cached == 0
    assert abs(logprob - trainer_logprob(token)) <= 1e-4


@pytest.mark.vllm
def test_adapter_above_max_lora_rank_is_refused(lora_engine):
    engine, model_dir = lora_engine
    trainer = policy(model_dir, targets=["q_proj"], rank=32)
    with pytest.raises(ValueError, match="rank 32 exceeds the engine's max_lora_rank 16.*=32"):
        WeightSync(trainer, engine, strategy="adapter")
    assert engine.adapter is None  # refused before anything was sent


@pytest.mark.vllm
@pytest.mark.parametrize("choice", ["streaming", "adapter"])
def test_auto_measures_decides_and_keeps_parity(lora_engine, monkeypatch, choice):
    """Real measurements on vLLM, then a forced choice (timings on a shared 2-core machine are
    too noisy to assert which one wins; the regimes are tested with injected numbers in
    test_auto.py).
    Measuring streaming merged into the engine, so choosing the adapter must restore the base
    weights first, or the policy would apply twice."""
    real = choose_strategy
    seen = []

    def forced(measurements, tokens_per_step):
        seen.append(measurements)
        sync_seconds = {"streaming": 0.0, "adapter": 0.0} | {choice: -1.0}
        return real(Measurements(sync_seconds, {"streaming": 0.0, "adapter": 0.0}), 0)

    monkeypatch.setattr(auto, "choose_strategy", forced)
    engine, model_dir = lora_engine
    trainer = policy(model_dir, adapter_name="policy_v1", targets=["all-linear"])
    probes = probe_sequences(engine.vocab_size)
    sync = WeightSync(trainer, engine, strategy="auto", tokens_per_step=100)

    assert sync().strategy == sync.decision.strategy == choice
    (measured,) = seen
    for costs in (measured.sync_seconds, measured.decode_seconds_per_token):
        assert set(costs) == {"streaming", "adapter"} and min(costs.values()) > 0
    assert (engine.adapter is not None) == (choice == "adapter")
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    train_step(trainer)
    assert sync().strategy == choice
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    with torch.no_grad(), trainer.disable_adapter():
        assert verify(trainer, engine, probes).max_abs_diff > 1e-2


# --- the CLI ----------------------------------------------------------------------------


@pytest.mark.vllm
def test_sync_check_strategy_adapter(tiny_model, tmp_path):
    base = tiny_model("llama")
    r = run_lorasync("make-adapter", "--base", base, "--out", str(tmp_path / "adapter"),
                     "--rank", "4", "--adapter-name", "pol", "--seed", "7")
    assert r.returncode == 0, r.stderr
    r = run_lorasync("sync-check", "--base", base, "--adapter", str(tmp_path / "adapter"),
                     "--strategy", "adapter", "--repeat", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] and result["max_abs_logprob_diff"] <= 1e-4
    assert result["strategy"] == "adapter" and result["weight_version"] == 2
    assert result["base_max_abs_change"] == 0


@pytest.mark.slow  # a fresh `lorasync` process: torch and transformers imported, 5-10 s on 2 cores
def test_sync_check_strategy_adapter_refuses_modules_to_save_before_building_an_engine(
    tiny_model, tmp_path
):
    base = tiny_model("llama")
    make_random_adapter(base, tmp_path / "adapter", AdapterSpec(targets=["q_proj"], modules_to_save=["lm_head"]))
    r = run_lorasync("sync-check", "--base", base, "--adapter", str(tmp_path / "adapter"),
                     "--strategy", "adapter")
    assert r.returncode == 2
    assert "modules_to_save=['lm_head']" in r.stderr and "strategy='streaming'" in r.stderr
