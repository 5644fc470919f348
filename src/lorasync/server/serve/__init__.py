"""Server mode, the server's side: what `lorasync serve` runs (`launch.py`), and what runs
inside it: `guard.TokenGuard` and `lease.PauseLease` (ASGI middleware of vLLM's API server)
and `receiver.LoraTransferEngine` (vLLM's weight-transfer backend `lorasync`, in each worker:
the merge of received factors into its pristine copy of the checkpoint). Imports nothing of
the trainer but the types of `client/control.py` that the TCP transport's halves share.
"""
