"""Server mode: `lorasync serve` (a vLLM OpenAI server with lorasync's receiver) and its client.

Trainer side: `client.ServerEngine` (the engine facade and the two-phase, all-or-none sync)
over `control.py` (HTTP), `transport_tcp.py` and `transport_nccl.py` (the bytes). Server side,
inside vLLM: `receiver.py` (the weight-transfer backend) and `guard.py` (the token guard).
Both sides: `wire.py` (the TCP wire format) and `nccl.py` (the NCCL group). `launch.py` starts
servers. The names both sides must agree on are here.
"""

BACKEND = "lorasync"  # the weight-transfer backend's name: --weight-transfer-config
TOKEN_ENV = "LORASYNC_TOKEN"  # the environment variable holding the server's token
# the one holding its admin token (the sync routes); unset: the token is the admin token too
ADMIN_TOKEN_ENV = "LORASYNC_ADMIN_TOKEN"
# what a sync does to the requests running on a server: vLLM's pause modes `wait` (they finish
# on the old weights first) and `keep` (frozen, then continued on the new ones); never `abort`
IN_FLIGHT = ("wait", "keep")
