"""Server mode, the trainer's side: `engine.ServerEngine` (one or more servers seen as one
engine), the two-phase, all-or-none sync (`update.py`), the HTTP control of a server
(`control.py`), and generation over the OpenAI API (`completions.py`) or vLLM's token route
(`tokens.py`). The bytes of a sync go by a transport (`server/transports/`).

`from lorasync.server.client import ServerEngine`, the path before the split by side, still
works with a DeprecationWarning (CHANGELOG.md): the name is loaded on first use, so the
receiver, which imports `control.py`'s types through the TCP transport, does not load the
trainer's engine.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorasync.server.client.engine import ServerEngine

def __getattr__(name: str) -> object:
    if name == "ServerEngine":
        warnings.warn(
            "lorasync.server.client.ServerEngine moved to lorasync.server.client.engine.ServerEngine",
            DeprecationWarning, stacklevel=2,
        )
        from lorasync.server.client.engine import ServerEngine

        return ServerEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
