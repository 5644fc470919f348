"""Server mode over NCCL: the same sync as test_client.py with the bytes moved by NCCL
broadcast from the trainer's GPU to the server's. Marked `gpu`: skipped without CUDA (this
project's CI has none), so these have not run here; see docs/server.md."""

import time

import pytest
import torch

from lorasync.server import transport_nccl
from lorasync.server.client import ServerEngine
from lorasync.server.control import ServerSyncError
from lorasync.sync.verify import probe_sequences, verify
from lorasync.sync.weight_sync import WeightSync
from tests.helpers import TOKEN, Server, policy


def needs_gpu(test):
    """An NCCL test: needs a CUDA GPU, starts a real vLLM server."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA GPU")
    return pytest.mark.gpu(pytest.mark.vllm(no_gpu(test)))


def test_transport_is_checked_before_any_server_is_contacted():
    with pytest.raises(ValueError, match="transport must be one of tcp, nccl"):
        ServerEngine("http://127.0.0.1:9", TOKEN, transport="rdma")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs no accelerator"):
            ServerEngine("http://127.0.0.1:9", TOKEN, transport="nccl")


@pytest.fixture(scope="module")
def server(tiny_model):
    """One GPU server (only GPU tests use it: they are marked `vllm` too)."""
    # no --enforce-eager: on a GPU, the reload must also be right under CUDA graphs
    gpu = Server(tiny_model("qwen2"), vllm_args=("--dtype", "float32", "--max-model-len", "512",
                                                 "--gpu-memory-utilization", "0.3"))
    try:
        yield gpu.start().wait()
    finally:
        gpu.kill()


@needs_gpu
def test_nccl_factor_sync_gives_parity(server, tiny_model):
    trainer = policy(tiny_model("qwen2"), targets=["all-linear"], modules_to_save=["lm_head"])
    engine = ServerEngine(server.url, TOKEN, transport="nccl")
    sync = WeightSync(trainer, engine, "factors")
    probes = probe_sequences(engine.vocab_size)
    for _ in range(2):  # the second sync proves the group outlives one transfer
        report = sync()
        assert engine.served_versions() == [str(report.version)]
        assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    # the wire is the factors: far below the merged tensors
    assert engine.last_wire_bytes < report.bytes_sent * 1.1
    engine.close()


@needs_gpu
def test_nccl_refused_manifest_raises_in_bounded_time_and_keeps_the_version(
    server, tiny_model, monkeypatch
):
    """Refused by the client's own check (nothing is broadcast), then, with that check off,
    by the server: the broadcasts it never joins must not hang the client."""
    trainer = policy(tiny_model("qwen2"), targets=["all-linear"])
    engine = ServerEngine(server.url, TOKEN, transport="nccl", timeout=20)
    sync = WeightSync(trainer, engine, "factors")
    probes = probe_sequences(engine.vocab_size)
    report = sync()
    real = transport_nccl.manifest

    def wrong_scale(records, encoding="raw"):
        head = real(records, encoding)
        head["records"][0]["scale"] = "not a number"
        return head

    monkeypatch.setattr(transport_nccl, "manifest", wrong_scale)
    with pytest.raises(ServerSyncError, match="would refuse"):
        sync()
    monkeypatch.setattr(transport_nccl, "check_payload", lambda *args: None)
    start = time.monotonic()
    with pytest.raises(ServerSyncError, match="scale"):
        sync()
    assert time.monotonic() - start < 20 + 10
    assert engine.served_versions() == [str(report.version)]
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    monkeypatch.undo()
    with pytest.raises(ServerSyncError, match="make a new ServerEngine"):
        sync()
    engine.close()
    engine = ServerEngine(server.url, TOKEN, transport="nccl")  # a new group: syncs again
    WeightSync(trainer, engine, "factors")()
    assert verify(trainer, engine, probes).max_abs_diff <= 1e-4
    engine.close()
