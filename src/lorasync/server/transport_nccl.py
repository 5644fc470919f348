"""The NCCL transport: the manifest inline in the request, the tensors by NCCL broadcast.

On GPU machines the bytes go from this process's current CUDA device to the servers' GPU
workers (`nccl.py` has the group and the broadcasts, shared with the receiver). Untested on
this project's CI, which has no GPU: tests/server/test_nccl.py, marked `gpu`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import torch

from lorasync.checkpoint import DTYPES
from lorasync.server.control import Control, ServerInfo, ServerSyncError
from lorasync.server.launch import free_port
from lorasync.server.nccl import open_trainer, rendezvous, send_records, wait_sent
from lorasync.server.wire import PayloadError, check_payload, manifest
from lorasync.sync.base import Record


class NcclTransport:
    """Transfers by NCCL broadcast from this process (rank 0) to each server's workers."""

    def __init__(self, control: Control, host: str) -> None:
        if not torch.cuda.is_available():
            raise ValueError(
                "transport='nccl' sends from a CUDA GPU and this process has none; use "
                "transport='tcp' (the default), which needs no accelerator"
            )
        self.control = control
        self.host = host
        self.stream = torch.cuda.Stream()
        self._servers: list[ServerInfo] = []

    def join(self, server: ServerInfo) -> None:
        """Open an NCCL group with one server's workers, this process being rank 0. Both
        sides block in the rendezvous, so the server is asked to join from a thread."""
        meeting = rendezvous(self.host, free_port(self.host), server.workers)
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(
                self.control.call, server.url, "POST", "/init_weight_transfer_engine",
                json={"init_info": {"nccl": meeting}},
            )
            server.group = open_trainer(meeting)
            request.result()
        self._servers.append(server)

    def send(self, server: ServerInfo, records: list[Record]) -> int:
        """The manifest inline in `/update_weights`, the tensors by NCCL broadcast beside it
        (the request returns once the server has them all); return the bytes moved."""
        if server.group is None:
            raise ServerSyncError(
                f"{server.url}: the NCCL group with this server was lost in an earlier failed "
                "transfer; make a new ServerEngine to sync again"
            )
        head = manifest(records)
        try:  # the server checks it too, but a refusal there would leave the broadcasts hanging
            check_payload(head, server.layout, DTYPES[server.dtype], server.max_payload_bytes)
        except PayloadError as err:
            raise ServerSyncError(f"{server.url}: not sent, the server would refuse it: {err}") from None
        request = self.control.start(server.url, "/update_weights", json={"update_info": {"manifest": head}})
        device = torch.device("cuda", torch.cuda.current_device())
        sent = send_records(server.group, records, device, self.stream)
        try:
            wait_sent(self.stream, request.running, request.failed, self.control.timeout)
        except PayloadError as err:
            # Abandoned, not destroyed: destroying a communicator with a broadcast pending
            # blocks. Its stream is this transport's own, so the trainer's work is not held up.
            server.group = None
            raise request.error or ServerSyncError(f"{server.url}: {err}") from None
        request.wait()
        return len(json.dumps(head)) + sum(t.numel() * t.element_size() for t in sent)

    def close(self) -> None:
        for server in self._servers:
            if server.group is not None:
                server.group.destroy()
                server.group = None
