"""How the bytes of a server sync travel: each transport module holds both halves, the
client's (`TcpTransport`, `NcclTransport`) and the receiver's (the functions
`serve/receiver.py` calls), after vLLM's `weight_transfer` backends; its format is beside it.

- `tcp.py` + `wire.py` (its wire format) + `readback.py` (the read-back's format): a stream
  each server opens back to a one-shot listener of the client, proved by a nonce.
- `nccl.py` + `nccl_group.py` (the group, its rendezvous message, the broadcasts): on GPU
  machines, the manifest inline in the request and the tensors by NCCL broadcast.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from lorasync.sync.base import Record

if TYPE_CHECKING:
    from lorasync.server.client.control import ServerInfo


class Transport(Protocol):
    """How the bytes of a transfer reach servers whose update sessions are open: `records`,
    read once, as `declared` (`wire.send_payload`); returns the bytes sent to each."""

    def send(self, servers: Sequence[ServerInfo], records: Iterable[Record], declared: Sequence[Record]) -> int: ...

    def close(self) -> None: ...
