"""The trainer's side of the engine (train/generation.py, `Generation`): `auto` is handed the tokens
one step generates, a batch keeps syncs out (the engine's lock) unless `rollout.in_flight: keep`
lets them in, and on a rank other than 0 a shared engine takes the version rank 0's sync
reported without syncing itself. In-memory engines and a tiny model; the collective that hands
rank 0's report over is stood in for, so no process group is started.
"""

from lorasync.sync.base import SyncReport
from lorasync.train import generation, rank_sync
from lorasync.train.distributed import Dist
from tests.helpers import MemoryReceiver, demo_trainer_config, policy
from tests.sync.test_weight_sync import AdapterMemory


class SharedMemory(MemoryReceiver):
    """A MemoryReceiver all ranks share (a `SharedEngine`, as servers are): notes the versions
    it is told to follow."""

    shared = True

    def __init__(self, model_dir) -> None:
        super().__init__(model_dir)
        self.followed: list[int] = []

    def follow(self, version: int) -> None:
        self.followed.append(version)


def test_auto_is_handed_the_tokens_one_step_generates(tiny_model, tmp_path):
    model_dir = tiny_model("qwen2")
    config = demo_trainer_config(model_dir, tmp_path, sync={"strategy": "auto"},
                                 rollout={"prompts_per_step": 2, "num_generations": 3, "max_tokens": 5})
    gen = generation.Generation(AdapterMemory(model_dir), policy(model_dir), config, Dist())
    assert gen.sync.tokens_per_step == 2 * 3 * 5


def test_a_batch_keeps_syncs_out_unless_in_flight_keep_lets_them_in(tiny_model, tmp_path, monkeypatch):
    model_dir = tiny_model("qwen2")
    keep = {"engine": {"kind": "server", "servers": ["http://127.0.0.1:9"]}, "sync": {"strategy": "streaming"},
            "rollout": {"mode": "async", "in_flight": "keep"}}
    locked = {}
    for in_flight, changes in (("wait", {}), ("keep", keep)):
        config = demo_trainer_config(model_dir, tmp_path / in_flight, **changes)
        assert config.rollout.in_flight == in_flight
        gen = generation.Generation(MemoryReceiver(model_dir), policy(model_dir), config, Dist())
        monkeypatch.setattr(generation, "generate", lambda *args, seed, gen=gen: gen.lock.locked())
        locked[in_flight] = gen.generate(None, [], seed=0)
    assert locked == {"wait": True, "keep": False}


def test_a_shared_engine_follows_the_version_rank_0_synced(tiny_model, tmp_path, monkeypatch):
    model_dir = tiny_model("qwen2")
    config = demo_trainer_config(model_dir, tmp_path)
    rank_0 = SyncReport("streaming", 3, 300, 0.1, version=7)
    sent = []

    def broadcast(value, d, what=""):  # what rank 0's collective hands every rank
        sent.append(value)
        return value if d.main else rank_0

    monkeypatch.setattr(rank_sync, "broadcast_object", broadcast)
    for rank in (1, 0):
        engine = SharedMemory(model_dir)
        report = generation.Generation(engine, policy(model_dir), config, Dist(rank, 2)).sync_policy()
        if rank:  # took rank 0's version, sent nothing
            assert report is rank_0 and sent[-1] is None
            assert engine.followed == [7] and engine.loads == 0 and engine.weight_version == 0
        else:  # synced the engine itself; nothing to follow
            assert report.version == engine.weight_version == 1 and engine.loads == 1
            assert engine.followed == []
