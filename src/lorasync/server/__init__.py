"""Server mode: `lorasync serve` (a vLLM OpenAI server with lorasync's receiver) and its client.

One folder a side: `client/` (the trainer's: `ServerEngine`, the two-phase, all-or-none sync,
HTTP), `serve/` (the server's: `lorasync serve`, the token guard, the pause lease, the
receiver inside vLLM's workers), and `transports/` (how the bytes go, TCP or NCCL, each module
holding both halves and its format beside it). The names both sides must agree on are here.
"""

BACKEND = "lorasync"  # the weight-transfer backend's name: --weight-transfer-config
TOKEN_ENV = "LORASYNC_TOKEN"  # the environment variable holding the server's token
# the one holding its admin token (the sync routes); unset: the token is the admin token too
ADMIN_TOKEN_ENV = "LORASYNC_ADMIN_TOKEN"
