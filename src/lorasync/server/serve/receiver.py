"""The server side of a server sync: a vLLM weight-transfer backend.

Loaded into a vLLM OpenAI server by vLLM's plugin mechanism: `register` is the package's
`vllm.general_plugins` entry point, which vLLM calls in each of its processes; it registers
`LoraTransferEngine` with vLLM's `WeightTransferEngineFactory` under the name `lorasync`, so
`--weight-transfer-config '{"backend": "lorasync"}'` selects it and vLLM's own routes drive it
(`/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`), behind `guard.TokenGuard`.

`/init_weight_transfer_engine` takes a `mode` besides the endpoint (host, port, nonce) to
connect back to: `info` (the default) reports what this server serves (layout, groups, dtype,
vocabulary); `read_back` streams what its model holds, tensor by tensor under checkpoint
names, for the weight-level verdict (`transports/readback.py` has the format); with `nccl`, the worker
joins the trainer's NCCL group instead.

The engine receives LoRA factors (the transports' receiving halves: `transports/tcp.py`,
`transports/nccl.py`) and merges on the engine side: it
keeps a host-memory copy of the checkpoint's values of only the groups a sync touches (the
"pristine" copy), computes W0 + scale * B @ A, and reloads whole fused groups in place.
Nothing here imports lorasync's trainer side.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from lorasync.served_model import checkpoint_index, weight_groups
from lorasync.engines import vllm_compat
from lorasync.engines.readback import read_back as model_tensors
from lorasync.engines.worker import reload_tensors
from lorasync.server import BACKEND
from lorasync.server.transports import nccl, tcp
from lorasync.server.transports.readback import INFO, MODES, READ_BACK
from lorasync.server.transports.tcp import Endpoint
from lorasync.server.transports.wire import Deadline, PayloadError, tensor_bytes
from lorasync.sync.base import Record
from lorasync.sync.merge_kernel import choose
from lorasync.sync.merged_weight import MergedWeight

MAX_BYTES_ENV = "LORASYNC_MAX_PAYLOAD_BYTES"
TIMEOUT_ENV = "LORASYNC_TRANSFER_TIMEOUT"
# Set to 1 in the server's environment to load NaN or Inf values (refused by default).
ALLOW_NON_FINITE_ENV = "LORASYNC_ALLOW_NON_FINITE"

log = logging.getLogger(__name__)


def refuse_non_finite(records: list[Record]) -> None:
    """PayloadError naming the first record with a NaN or Inf value or scale: the wire carries
    any float, and a merge would spread one bad factor over a whole weight. The trainer
    refuses to send them (`weight_sync.check_finite`); this covers any other client."""
    for record in records:
        if record.scale is not None and not torch.isfinite(torch.tensor(record.scale)):
            raise PayloadError(f"{record.name}: scale {record.scale} is not finite; nothing was loaded")
        for tensor in record.tensors:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise PayloadError(
                    f"{record.name}: {bad} non-finite value(s) (NaN or Inf); nothing was loaded. "
                    f"A server started with {ALLOW_NON_FINITE_ENV}=1 loads them"
                )


def register() -> None:
    """vLLM plugin entry point: make the `lorasync` weight-transfer backend available."""
    vllm_compat.register_transfer_backend(BACKEND, __name__, "LoraTransferEngine")


@dataclass
class Init(Endpoint):
    """An `/init_weight_transfer_engine` request: by `mode`, report what this server serves
    to the endpoint (`info`) or stream what its model holds there (`read_back`); or, with
    `nccl`, join the trainer's NCCL group (`nccl.rendezvous`)."""

    nccl: dict | None = None
    mode: str = INFO
    only: list[str] | None = None  # read_back: just the modules holding these checkpoint names


@dataclass
class Update(Endpoint):
    """An `/update_weights` request: read the payload from the endpoint (TCP), or, with
    `manifest`, receive its tensors over the NCCL group joined at init; or, with `discard`,
    drop the payload this session received (another server of the same sync failed)."""

    manifest: dict | None = None
    discard: bool = False


class LoraTransferEngine(WeightTransferEngine):
    """vLLM WeightTransferEngine receiving LoRA factors over TCP, merging on the engine side.

    Built by vLLM's worker after the model is loaded (`WeightTransferEngineFactory`).
    """

    init_info_cls = Init
    update_info_cls = Update
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.dtype: torch.dtype = vllm_config.model_config.dtype
        self.layout, self._files = checkpoint_index(vllm_config.model_config.model)
        self.groups = weight_groups(self.layout, vllm_compat.packed_modules(model))
        self._group_of = {name: i for i, g in enumerate(self.groups) for name in g}
        self.pristine: dict[str, torch.Tensor] = {}
        self.group = None  # the NCCL communicator, once a client joined with transport="nccl"
        self._pending: list[Record] | None = None
        # Groups whose served values differ from the checkpoint. A sync reloads them too, so
        # each sync is complete on its own: what an earlier client (another adapter, other
        # target modules) changed and this payload does not touch goes back to the checkpoint.
        self._dirty: set[int] = set()
        # seconds for one whole transfer (connecting and every read), not for each read, and
        # for joining an NCCL group
        self.timeout = float(os.environ.get(TIMEOUT_ENV, "120"))
        # A valid payload never exceeds the full size of every checkpoint tensor (factors
        # are smaller than the tensors they change); anything larger is refused unread.
        full = sum(tensor_bytes(shape, self.dtype) for shape in self.layout.values())
        self.max_bytes = int(os.environ.get(MAX_BYTES_ENV, full))

    def init_transfer_engine(self, init_info: Init) -> None:
        """Tell the client what this server serves: layout, fused groups, dtype, vocab, and
        how many workers would join an NCCL group; or join that group; or, in `read_back`
        mode, show it what the model holds."""
        if init_info.mode not in MODES:
            raise ValueError(f"init_info mode must be one of {', '.join(MODES)}, got {init_info.mode!r:.40}")
        if init_info.mode == READ_BACK:
            if init_info.nccl is not None:
                raise ValueError("a read-back goes over TCP: an init_info with mode 'read_back' takes no 'nccl'")
            return self.read_back(init_info, init_info.only)
        if init_info.only is not None:
            raise ValueError("'only' names what a read-back reads: it needs mode 'read_back'")
        if init_info.nccl is not None:
            self.shutdown()  # a new client: the previous one's group is gone with it
            self.group = nccl.join_workers(init_info.nccl, self.parallel_config, self._deadline())
            return
        hf = self.model_config.hf_config.get_text_config()
        info = {
            "layout": {k: list(v) for k, v in self.layout.items()},
            "groups": self.groups,
            "dtype": str(self.dtype).removeprefix("torch."),
            "vocab_size": hf.vocab_size,
            "max_payload_bytes": self.max_bytes,
            "workers": self.parallel_config.world_size,
            # factors that arrive over TCP merge in host memory, by the kernel measured
            # fastest on this machine (over NCCL they merge on the device: addmm)
            "merge_kernel": choose(self.dtype, "cpu").kernel.value,
        }
        tcp.send_info(init_info, info, self.timeout)

    @torch.no_grad()
    def read_back(self, endpoint: Endpoint, only: list[str] | None = None) -> None:
        """Stream, to `endpoint`, every tensor the model holds under its checkpoint name (with
        `only`, of the modules holding those names), one at a time (`engines/readback.read_back`;
        the format: `transports/readback.py`). The worker does nothing else meanwhile; one deadline
        (`LORASYNC_TRANSFER_TIMEOUT`) bounds it all."""
        if only is not None and not (isinstance(only, list) and all(isinstance(n, str) for n in only)):
            raise ValueError(f"init_info 'only' must be a list of checkpoint names, got {only!r:.100}")
        if self.parallel_config.world_size != 1:
            raise ValueError(
                f"a read-back of a server with {self.parallel_config.world_size} workers (tensor or "
                "pipeline parallel) is not supported: each worker holds a shard"
            )
        deadline = self._deadline()
        hf = self.model_config.hf_config.get_text_config()
        tensors = model_tensors(self.model, self.layout, vllm_compat.packed_modules(self.model), hf.model_type, only)
        sent = tcp.send_model(endpoint, tensors, deadline)
        log.info("lorasync: read back %.1f MB", sent / 1e6)

    def _deadline(self) -> Deadline:
        """One deadline of `timeout` seconds (a whole transfer, a read-back, an NCCL join)."""
        return Deadline(self.timeout, f"set {TIMEOUT_ENV} (seconds, now {self.timeout:g}) in the server's environment")

    def start_weight_update(self) -> None:
        self._pending = None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class also synchronizes an accelerator; there is none to wait for here.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: Update) -> None:
        """Read and check the whole payload, and the pristine values it needs; load nothing.

        Loading waits for `finish_weight_update`, so a transfer that fails here (bad
        payload, client gone, timeout), or one discarded, leaves the served weights as they were.
        """
        self._pending = None
        if update_info.discard:
            log.info("lorasync: received payload discarded")
            return
        deadline = self._deadline()
        if update_info.manifest is not None:
            records = nccl.receive(self.group, update_info.manifest, self.layout, self.dtype, self.max_bytes,
                                   self.device, deadline)
        else:
            records = tcp.receive_payload(update_info, self.layout, self.dtype, self.max_bytes, deadline)
        if os.environ.get(ALLOW_NON_FINITE_ENV) != "1":
            refuse_non_finite(records)
        full = {r.name for r in records if r.scale is None}  # sent whole: no base value needed
        for name in self._touched(records):
            if name not in self.pristine and name not in full:
                with safe_open(self._files[name], framework="pt") as f:
                    self.pristine[name] = f.get_tensor(name).to(self.dtype)
        log.info(
            "lorasync: received %d records; pristine copy %.1f MB over %d tensors",
            len(records), self.pristine_bytes / 1e6, len(self.pristine),
        )
        self._pending = records

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pristine.values())

    def _groups_of(self, records: list[Record]) -> set[int]:
        return {self._group_of[r.name] for r in records}

    def _touched(self, records: list[Record]) -> list[str]:
        """Every member of every group a record touches or an earlier sync changed (vLLM
        reloads whole groups)."""
        groups = sorted(self._groups_of(records) | self._dirty)
        return [name for g in groups for name in self.groups[g]]

    def _merged(self, records: list[Record]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each touched tensor's new value, one at a time: full, merged or pristine."""
        by_name = {r.name: r for r in records}
        for name in self._touched(records):
            record = by_name.get(name)
            if record is None:
                yield name, self.pristine[name]
            elif record.scale is None:
                yield name, record.tensors[0]
            else:
                b, a = record.tensors  # on the accelerator after an NCCL transfer
                # merged straight into vLLM's parameter as its loader copies it there
                kernel = choose(self.dtype, b.device).kernel
                yield name, MergedWeight(self.pristine[name].to(b.device), b, a, record.scale, kernel)

    def finish_weight_update(self) -> None:
        """Load the pending transfer in place (whole fused groups), then drop it."""
        records, self._pending = self._pending, None
        if not records:
            return
        reload_tensors(
            lambda stream: vllm_compat.reload_server_model(self.vllm_config, self.model, stream),
            self.model,
            self.model_config.hf_config.get_text_config().tie_word_embeddings,
            self._merged(records),
        )
        self._dirty = self._groups_of(records)

    def shutdown(self) -> None:
        self._pending = None
        if self.group is not None:
            self.group.destroy()
            self.group = None


