"""The sync on N ranks (train/rank_sync.py) under FSDP2, 2 ranks as processes (gloo on CPU) with
in-memory engines: a factor sync gathers the trainable tensors only (`gathered`) and sends,
from rank 0, exactly what the unsharded policy sends; a merged sync gathers each tensor as the
engine takes it (`Gathering`), never more than two of the largest at once
(`sync_gathered_mb`), colocated or into a shared engine that rank 0 alone syncs
(`sync_policy`). Every test spawns ranks (about 10-20 s each on 2 cores; no vLLM engine):
marked `distributed`, outside the fast tier, each with a timeout.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lorasync.sync.base import Record
from lorasync.train import distributed, rank_sync
from lorasync.train.config import ParallelConfig
from tests.helpers import MemoryReceiver, policy, run_ranks

heavy = pytest.mark.distributed  # spawns ranks (processes; no vLLM engine): outside the fast tier


class RecordingReceiver(MemoryReceiver):
    """A `RecordReceiver`: keeps the records of each factor sync, as a server would get them."""

    merge_kernel = "addmm"  # as a server names its kernel (never runs here)

    def __init__(self, model_dir) -> None:
        super().__init__(model_dir)
        self.records: list[list[Record]] = []

    def load_records(self, records) -> int:
        self.records.append([Record(r.name, tuple(t.clone() for t in r.tensors), r.scale) for r in records])
        self.weight_version += 1
        return self.weight_version


def _factors(rank: int, model_dir: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from lorasync.sync.weight_sync import WeightSync

    d = distributed.init(ParallelConfig(mode="fsdp2", timeout_seconds=60))
    # random B: factors that matter; a trained lm_head copy: a modules_to_save tensor goes whole
    model = policy(model_dir, targets=["all-linear"], rank=4, seed=3, modules_to_save=["lm_head"])
    unsharded = copy.deepcopy(model)
    distributed.wrap(model, d)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    gathered, full_tensor = [], DTensor.full_tensor
    DTensor.full_tensor = lambda self: gathered.append(self.requires_grad) or full_tensor(self)
    engine, reference = RecordingReceiver(model_dir), RecordingReceiver(model_dir)
    tally = rank_sync.gathering(engine, d, shared=True)
    sync = WeightSync(model, engine, "factors", load_weights=tally.load_weights)
    unsharded_sync = WeightSync(unsharded, reference, "factors")
    for step in range(2):  # a step between: the second sync must send the updated values
        if step:
            with torch.no_grad():
                for one in (model, unsharded):  # the same update, on shards and on whole tensors
                    for p in one.parameters():
                        if p.requires_grad:
                            p.add_(0.01 * (step + 1))
        report = rank_sync.sync_policy(sync, d, shared=True, tally=tally)
        unsharded_sync()
        held = rank_sync.gathering_metrics(tally)["sync_gathered_mb"] * 2**20
        assert held == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) > 0
    DTensor.full_tensor = full_tensor
    if rank == 0:
        torch.save({"sent": engine.records, "reference": reference.records, "gathered": gathered,
                    "version": report.version}, f"{out}/factors.pt")
    else:
        assert engine.records == [] and report.version == 2  # rank 0 alone sends; all learn the version
    distributed.close(d)


@heavy
def test_fsdp2_sends_the_unsharded_factors_exactly_and_gathers_no_base_weight(tiny_model, tmp_path):
    """Under FSDP2 every parameter is a shard; the factor sync gathers the LoRA factors and
    `modules_to_save` (a trained lm_head copy) with `full_tensor()` on both ranks, then rank 0
    sends. What it sends equals, bit for bit, what the same policy unsharded sends, at a first
    sync and after an update (checked to fail with the `Merger` keeping the first sync's
    gathered lm_head: the second sync sent it stale), no frozen base tensor was gathered, and
    `sync_gathered_mb` counts the gathered factors (rank 0 holds them while it sends). Checked
    to fail: sending each rank's local shards (`to_local()` instead of `full_tensor()`: wrong
    shapes), gathering `everything` (base weights gathered), and gathering on rank 0 only
    (the test's timeout: 2 ranks never hang)."""
    model = tiny_model("qwen2")
    assert run_ranks(_factors, 2, model, str(tmp_path), timeout=240) == [0, 0]
    saved = torch.load(tmp_path / "factors.pt", weights_only=False)
    assert saved["version"] == 2
    assert len(saved["sent"]) == len(saved["reference"]) == 2
    for sent, reference in zip(saved["sent"], saved["reference"]):
        assert [r.name for r in sent] == [r.name for r in reference] and len(sent) > 0
        assert "lm_head.weight" in [r.name for r in sent if r.scale is None]  # modules_to_save, whole
        for s, r in zip(sent, reference):
            assert s.scale == r.scale
            assert all(torch.equal(x, y) for x, y in zip(s.tensors, r.tensors, strict=True)), s.name
    assert saved["gathered"] and all(saved["gathered"])  # trainable (LoRA) tensors only


class CountingReceiver(MemoryReceiver):
    """A `MemoryReceiver` that notes, as it takes each tensor of a stream, how many gathers
    (`counter()`) had run by then."""

    def __init__(self, model_dir, counter) -> None:
        super().__init__(model_dir)
        self.counter, self.gathers_at = counter, []

    def load_weights(self, weights) -> int:
        def counted():
            for item in weights:
                self.gathers_at.append(self.counter())
                yield item

        return super().load_weights(counted())


def _merged(rank: int, model_dir: str, out: str, strategy: str, shared: bool) -> None:
    from torch.distributed.tensor import DTensor

    from lorasync.sync.weight_sync import WeightSync

    d = distributed.init(ParallelConfig(mode="fsdp2", timeout_seconds=60))
    torch.manual_seed(0)  # PEFT draws lora_A from the global RNG: the same on both ranks
    model = policy(model_dir, targets=["all-linear"], rank=4, seed=3)
    unsharded = copy.deepcopy(model)
    distributed.wrap(model, d)
    shards = {n: p.to_local().clone() for n, p in model.named_parameters()}
    gathered, full_tensor = [], DTensor.full_tensor
    DTensor.full_tensor = lambda self: gathered.append(1) or full_tensor(self)
    engine = CountingReceiver(model_dir, lambda: len(gathered))
    tally = rank_sync.gathering(engine, d, shared=shared)
    sync = WeightSync(model, engine, strategy, load_weights=tally.load_weights)
    reports = [rank_sync.sync_policy(sync, d, shared=shared, tally=tally) for _ in range(2)]
    DTensor.full_tensor = full_tensor
    reference = MemoryReceiver(model_dir)
    WeightSync(unsharded, reference, strategy)()
    torch.save({"sent": engine.tensors, "reference": reference.tensors, "gathers_at": engine.gathers_at,
                "gathers": len(gathered), "versions": [r.version for r in reports],
                "peak": rank_sync.gathering_metrics(tally)["sync_gathered_mb"] * 2**20,
                "largest": max(t.numel() * t.element_size() for t in reference.tensors.values()),
                "model": sum(t.numel() * t.element_size() for t in reference.tensors.values()),
                "restored": max((p.to_local() - shards[n]).abs().max().item() for n, p in model.named_parameters())},
               f"{out}/merged-{rank}.pt")
    distributed.close(d)


@heavy
@pytest.mark.parametrize("strategy", ["streaming", "merge-unmerge"])
@pytest.mark.parametrize("shared", [False, True], ids=["colocated", "shared"])
def test_fsdp2_merged_syncs_gather_one_tensor_at_a_time(tiny_model, tmp_path, strategy, shared):
    """A merged sync under FSDP2 (`streaming`, or `merge-unmerge`: PEFT's merge on the
    shards), two syncs. Each tensor is gathered as the engine takes it (its base weight and
    factors, for a streamed one): the gathers are spread over the stream (at most 3 before each
    tensor: W, B and A), and the gathered tensors alive at once never exceed two of the
    largest (the one the engine copies and the next), a fraction of the model. What arrives
    equals, bit for bit, what the unsharded policy sends, and the shards are back after the
    unmerge. Colocated, both ranks send into their own engines; into shared servers both
    gather, rank 0 alone sends, and both learn its version. Checked to fail with the whole
    model gathered before the sync (100+ gathers before the first tensor, and a peak of the
    whole model), with rank 1 skipping the sync into shared servers (the test's timeout:
    rank 0's gathers wait for it), and with rank 1 sending too."""
    model = tiny_model("llama")
    assert run_ranks(_merged, 2, model, str(tmp_path), strategy, shared, timeout=240) == [0, 0]
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"merged-{rank}.pt", weights_only=False)
        sent, reference = saved["sent"], saved["reference"]
        assert saved["versions"] == [1, 2]
        assert saved["restored"] <= (1e-6 if strategy == "merge-unmerge" else 0.0), saved["restored"]
        assert saved["gathers"] > len(reference)  # every rank gathers, sending or not
        assert 0 < saved["peak"] <= 2 * saved["largest"] < saved["model"] / 2, (saved["peak"], saved["largest"])
        if shared and rank == 1:
            assert sent == {} and saved["gathers_at"] == []
            continue
        assert sent.keys() == reference.keys() and len(sent) > 10
        for name in sent:
            assert torch.equal(sent[name], reference[name]), name
        steps = [b - a for a, b in zip([0] + saved["gathers_at"], saved["gathers_at"])]
        assert max(steps) <= 3 and saved["gathers_at"][-1] >= len(sent), steps
