"""`rollout.mode: async` in the trainer: K = 0 is the synchronous run exactly; no batch staler
than K is ever trained on; every token carries the version that sampled it; a failed producer
ends the run with its error and keeps the last finished step's checkpoint.

The claims here are about the trainer, so the in-memory engine of test_iterations.py stands in
for vLLM; tests/train/test_trainer.py runs async mode on real vLLM (health check included).
"""

import pytest
import torch

from lorasync.train.producer import Producer, ProducerError, StaleBatch
from lorasync.train.profile import PHASES
from tests.helpers import demo_trainer
from tests.train.test_iterations import RandomEngine

TIMING = {"step_seconds", "tokens_per_second", "generation_seconds", "wait_seconds", "sync_seconds",
          "trainer_gflops", "activation_bytes", *(f"seconds_{phase}" for phase in PHASES)}


def trainer_for(model_dir, out, mode="sync", k=0, steps=3, engine=None, save_every=0):
    return demo_trainer(
        model_dir, out, engine or RandomEngine(model_dir), steps,
        rollout={"mode": mode, "max_staleness": k}, save_every=save_every,
    )


def lora_state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}


def test_async_with_k_0_is_the_synchronous_run_exactly(tiny_model, tmp_path):
    model = tiny_model("qwen2")
    runs = {}
    for mode in ("sync", "async"):
        trainer = trainer_for(model, tmp_path / mode, mode=mode, k=0, steps=2)
        rows = trainer.train(progress=False)
        runs[mode] = ([{k: v for k, v in r.items() if k not in TIMING} for r in rows], lora_state(trainer))
    assert runs["sync"][0] == runs["async"][0]
    for name, value in runs["sync"][1].items():
        torch.testing.assert_close(runs["async"][1][name], value, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_batches_are_at_most_k_versions_old_and_every_token_says_which(tiny_model, tmp_path, k):
    model = tiny_model("qwen2")
    steps = k + 2
    trainer = trainer_for(model, tmp_path, mode="async", k=k, steps=steps, engine=RandomEngine(model))
    rows = trainer.train(progress=False)
    assert [r["staleness_max"] for r in rows] == [min(s, k) for s in range(steps)]  # instant generation runs k ahead
    for step, r in enumerate(rows):
        assert r["policy_versions"] == [max(0, step - k)]
        assert r["staleness_mean"] == r["staleness_max"]


def test_a_batch_staler_than_k_is_refused(tiny_model, tmp_path):
    """The trainer's own check, behind the producer's gate: a producer that runs further ahead
    (a bug) ends the run before a too-stale batch is trained on."""
    trainer = trainer_for(tiny_model("qwen2"), tmp_path, mode="async", k=1, steps=5)
    trainer.snapshots.record(0)
    loose = Producer(trainer._generate, 0, 5, max_staleness=3, timeout=10)
    try:
        with pytest.raises(StaleBatch, match="2 behind the engine's 2; rollout.max_staleness is 1"):
            for _ in range(5):
                trainer.train_step(loose)
    finally:
        loose.close()
    assert trainer.step == 2  # steps 1 and 2 trained on batches within the bound


class DiesAtStep3(RandomEngine):
    def generate(self, prompts, max_tokens, temperature=1.0, n=1, seed=None):
        if self.batches == 3:
            raise ConnectionError("http://127.0.0.1:8000 closed the connection")
        return super().generate(prompts, max_tokens, temperature, n, seed)


def test_a_dying_engine_ends_the_run_with_its_error_and_keeps_the_last_checkpoint(tiny_model, tmp_path):
    model = tiny_model("qwen2")
    trainer = trainer_for(model, tmp_path, mode="async", k=1, steps=6, engine=DiesAtStep3(model), save_every=1)
    with pytest.raises(ProducerError, match="step 4 failed.*closed the connection"):
        trainer.train(progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step-000003"
    assert not trainer_threads()


def trainer_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "lorasync-producer" and t.is_alive()]


def test_ctrl_c_in_the_trainer_stops_the_producer(tiny_model, tmp_path, monkeypatch):
    import time

    trainer = trainer_for(tiny_model("qwen2"), tmp_path, mode="async", k=2, steps=6, save_every=1)
    real = trainer._optimizer_step

    def interrupted(batch):
        if trainer.step == 2:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(trainer, "_optimizer_step", interrupted)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        trainer.train(progress=False)
    assert time.perf_counter() - start < 60
    assert not trainer_threads()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step-000002"
