"""The NCCL path of a server sync: the records of `wire.py`, moved by NCCL broadcast.

On GPU machines the bytes of a server sync can go from the trainer's GPU to the servers' GPU
workers over NCCL instead of a TCP stream. Everything else stays as on the TCP path: the
same records (LoRA factors, or whole tensors), the same manifest, checked by the receiver
against its checkpoint before any byte moves, and the same two-phase load. Only the bytes
travel differently: the manifest goes inline in the `/update_weights` request, and the
tensors follow as one NCCL broadcast each from the trainer (rank 0) to the server's workers
(ranks 1..n), in manifest order.

The process group is vLLM's own (`vllm.distributed.weight_transfer.nccl_common`, the helpers
its NCCL weight-transfer backend uses): `StatelessProcessGroup` rendezvous at the trainer's
address, then `PyNcclCommunicator`. Shared by the client (`transport_nccl.py`) and the
receiver (`receiver.py`), so it imports neither side.

Untested on this project's CI, which has no GPU: the tests are in tests/server/test_nccl.py,
marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lorasync.server.wire import PayloadError
from lorasync.sync.base import Record

# How often the client looks at its broadcasts while it waits for them (seconds).
_POLL = 0.05


def rendezvous(master_address: str, master_port: int, server_workers: int) -> dict[str, Any]:
    """What the trainer and one server's workers meet by: the trainer is rank 0."""
    return {
        "master_address": master_address,
        "master_port": master_port,
        "world_size": 1 + server_workers,
    }


def open_trainer(meeting: Mapping[str, Any]) -> Any:
    """Join the group as the trainer (rank 0) on this process's current CUDA device."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init(dict(meeting), rank=0)


def join_workers(meeting: Mapping[str, Any], parallel_config: Any) -> Any:
    """Join the group as one of the server's workers (ranks from 1), inside vLLM's worker."""
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_process_group,
    )

    info = NCCLWeightTransferInitInfo(
        master_address=meeting["master_address"],
        master_port=int(meeting["master_port"]),
        rank_offset=1,
        world_size=int(meeting["world_size"]),
    )
    return worker_init_process_group(info, parallel_config)


def send_records(
    group: Any, records: Sequence[Record], device: torch.device, stream: torch.cuda.Stream
) -> list[torch.Tensor]:
    """Enqueue one broadcast per tensor on `stream`, in manifest order; return the tensors.

    The broadcasts go on a stream of their own: if the receiver never joins them (it refused
    the manifest, or died), they wait forever, and the trainer's own work on its current
    stream must not wait behind them. NCCL sends `numel` elements from `data_ptr()`, so each
    tensor goes as a contiguous copy on `device`, recorded on `stream` so that the allocator
    does not hand its memory out again before the broadcast has read it.
    """
    sent = [t.detach().to(device).contiguous() for r in records for t in r.tensors]
    stream.wait_stream(torch.cuda.current_stream())  # the copies above are on that stream
    for tensor in sent:
        group.broadcast(tensor, src=0, stream=stream)
        tensor.record_stream(stream)
    return sent


def wait_sent(
    stream: torch.cuda.Stream, running: Callable[[], bool], failed: Callable[[], bool], timeout: float
) -> None:
    """Wait, at most `timeout` seconds, for the broadcasts on `stream` to finish.

    The receiver refuses a bad manifest before it joins any broadcast, and a dead server never
    joins; the broadcasts then never finish. So this polls instead of synchronizing: it stops
    when the request has failed (the caller raises its error), or when time runs out.
    """
    deadline = time.monotonic() + timeout
    while not stream.query():
        if (not running() and failed()) or time.monotonic() > deadline:
            raise PayloadError(
                "the NCCL broadcasts did not complete (the server refused the manifest, died, "
                f"or took over {timeout:.0f} s); the NCCL group is unusable now: make a new "
                "ServerEngine to sync again"
            )
        time.sleep(_POLL)


def recv_records(
    group: Any,
    checked: list[tuple[str, float | None, list[tuple[int, ...]]]],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Record]:
    """Receive the tensors of a checked manifest, in its order, onto `device`."""
    stream = torch.cuda.current_stream()
    records = []
    for name, scale, shapes in checked:
        tensors = tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
        for tensor in tensors:
            group.broadcast(tensor, src=0, stream=stream)
        records.append(Record(name, tensors, scale))
    stream.synchronize()
    return records
