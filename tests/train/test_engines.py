"""`lorasync train` through every engine kind: GRPO against a real `lorasync serve` server
(factor sync) and colocated with vLLM's own LoRA serving the adapter. In each, the engine's
sampling logprobs match the trainer's on the same tokens at every step (float32), the reward
is logged, and the engine's weight version counts the syncs. A run against a server resumes
onto the server even when it served another policy in between."""

import json
import os
from pathlib import Path

import pytest

from lorasync.backend.open import open_engine
from lorasync.server.client.engine import ServerEngine
from lorasync.sync.weight_sync import WeightSync
from lorasync.train.trainer import GRPOTrainer
from tests.helpers import TOKEN, Server, demo_trainer_config, policy, run_lorasync

pytestmark = pytest.mark.vllm
STEPS = 3
CONFIG = Path(__file__).parents[2] / "configs" / "digits.yaml"


@pytest.fixture(scope="module")
def server(demo_base):
    server = Server(str(demo_base)).start().wait()
    yield server
    server.kill()


def served_version(url: str) -> int:
    """The weight version the server reports (a fresh one reports "default": 0)."""
    engine = ServerEngine(url, TOKEN)
    try:
        served = engine.served_versions()[0]
    finally:
        engine.close()
    return int(served) if served.isdigit() else 0


def expected_version(before: int, steps: int) -> int:
    """One sync per step, plus the start's sync when the engine had served anything before
    (an engine as built serves the checkpoint, which a fresh adapter equals)."""
    return before + steps + (before > 0)


def train_against(server, tmp_path, demo_base, strategy: str, steps: int, resume: bool = False) -> list[dict]:
    """GRPO on the demo task against `server`, syncing by `strategy`; the rows of the run."""
    config = demo_trainer_config(
        demo_base, tmp_path, steps, save_every=2, engine={"kind": "server", "servers": [server.url]},
        sync={"strategy": strategy},
    )
    engine = open_engine("server", config.sync.strategy, servers=config.engine.servers, token=TOKEN)
    try:
        return GRPOTrainer(config, engine).train(resume=resume, progress=False)
    finally:
        engine.close()


def check_rows(rows: list[dict], strategy: str) -> None:
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert row["logprob_diff_max"] <= 1e-4, row
        assert row["sync_strategy"] == strategy
        assert "reward/digit_fraction_mean" in row and 0 <= row["reward_mean"] <= 1


@pytest.mark.parametrize("strategy", ["factors", "streaming"])
def test_grpo_against_a_lorasync_server(tmp_path, demo_base, server, strategy):
    before = served_version(server.url)
    rows = train_against(server, tmp_path, demo_base, strategy, STEPS)
    check_rows(rows, strategy)
    if strategy == "factors":  # a small fraction of the merged tensors they change
        assert all(0 < r["sync_bytes"] < 0.5e6 for r in rows)
    assert rows[-1]["weight_version"] == expected_version(before, STEPS) == served_version(server.url)


@pytest.mark.parametrize("mode,k,in_flight", [("sync", 0, "wait"), ("async", 1, "wait"), ("async", 1, "keep")])
def test_train_command_against_a_running_server(tmp_path, demo_base, server, mode, k, in_flight):
    """From the shell, synchronous and asynchronous (the server generates step s + 1 while the
    trainer trains step s; every batch at most one version old, its health scored by the
    policy that sampled it); with in_flight=keep a sync may land inside a batch, whose tokens
    then come from two versions, each token's health scored by its own."""
    before = served_version(server.url)
    r = run_lorasync(
        "train", "--config", str(CONFIG), f"model.base={demo_base}",
        "engine.kind=server", f"engine.servers=[{server.url}]", "sync.strategy=factors",
        f"rollout.mode={mode}", f"rollout.max_staleness={k}", f"rollout.in_flight={in_flight}",
        "optim.steps=5", f"output_dir={tmp_path}", env={"LORASYNC_TOKEN": TOKEN},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 5 steps" in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    check_rows(rows, "factors")
    assert max(r["staleness_max"] for r in rows) == k
    for row in rows:  # the versions trained on: the current one and, async, the one before
        current = row["weight_version"] - 1
        assert set(row["policy_versions"]) <= {current - k, current}, row
        assert len(row["policy_versions"]) == 1 or in_flight == "keep", row
    assert rows[-1]["weight_version"] == expected_version(before, 5) == served_version(server.url)
    assert (tmp_path / "checkpoints" / "step-000005" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("strategy", ["adapter", "auto"])
def test_grpo_colocated_through_vllm_lora(tmp_path, demo_base, strategy):
    config = demo_trainer_config(demo_base, tmp_path, STEPS, sync={"strategy": strategy})
    engine = open_engine("colocated", config.sync.strategy, str(demo_base), lora_rank=config.lora.rank)
    try:
        trainer = GRPOTrainer(config, engine)
        rows = trainer.train(progress=False)
        served_by_lora = engine.adapter is not None
    finally:
        engine.close()
    if strategy == "adapter":
        check_rows(rows, "adapter")
        assert served_by_lora and rows[-1]["weight_version"] == STEPS
    else:  # auto measured both on this engine at the first sync, and kept one
        chosen = trainer.generation.sync.decision.strategy
        check_rows(rows, chosen)
        assert served_by_lora == (chosen == "adapter")


def test_grpo_colocated_by_merge_unmerge(tmp_path, demo_base, engine_for):
    config = demo_trainer_config(demo_base, tmp_path, STEPS, sync={"strategy": "merge-unmerge"})
    rows = GRPOTrainer(config, engine_for(str(demo_base))).train(progress=False)
    check_rows(rows, "merge-unmerge")


def test_a_run_against_a_server_resumes_onto_the_served_policy(tmp_path, demo_base, server):
    train_against(server, tmp_path, demo_base, "factors", 2)
    other = ServerEngine(server.url, TOKEN)  # meanwhile the server serves another policy
    try:
        WeightSync(policy(str(demo_base), seed=5), other, "factors")()
    finally:
        other.close()
    rows = train_against(server, tmp_path, demo_base, "factors", 4, resume=True)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the resumed policy reached the server before step 3 generated
    check_rows(rows, "factors")


def test_a_server_killed_during_an_async_rollout_ends_the_run_with_a_clear_error(tmp_path, demo_base):
    """Async, K = 0 (the producer generates each batch while the trainer waits for it), a
    checkpoint every step, against a server of its own that is SIGKILLed at the start of the
    third batch's generation, in the producer's thread. The run ends within a bound (no
    deadlock between the trainer and the producer) with ProducerError naming the step and the
    server, and the checkpoint of step 2, the last finished, loads with `PeftModel`.
    Checked able to fail (a pytest plugin: the producer's `_run` keeping its error to itself
    and sleeping): the run hangs past the bound."""
    import signal
    import threading

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorasync.train.producer import ProducerError

    server = Server(str(demo_base)).start().wait()
    config = demo_trainer_config(
        demo_base, tmp_path, 50, save_every=1, engine={"kind": "server", "servers": [server.url]},
        sync={"strategy": "factors"}, rollout={"mode": "async"},
    )
    engine = open_engine("server", config.sync.strategy, servers=[server.url], token=TOKEN)
    generate, calls = engine.generate, []

    def generate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=60)
        return generate(*args, **kwargs)

    engine.generate = generate_then_die
    outcome: list[BaseException | None] = []

    def train() -> None:
        try:
            GRPOTrainer(config, engine).train(progress=False)
            outcome.append(None)
        except BaseException as err:  # handed to the test
            outcome.append(err)

    runner = threading.Thread(target=train, daemon=True)
    try:
        runner.start()
        runner.join(timeout=180)
        assert not runner.is_alive(), "the run still waits after its server died: a deadlock"
    finally:
        server.kill()
        engine.close()
    error = outcome[0]
    assert isinstance(error, ProducerError), error
    assert "step 3" in str(error) and server.url in str(error), error
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    base = AutoModelForCausalLM.from_pretrained(str(demo_base))
    PeftModel.from_pretrained(base, str(tmp_path / "checkpoints" / "step-000002" / "adapter"))
