"""`lorasync train --nproc N`: the same command on N ranks, started by torchrun.

torchrun (`torch.distributed.run`) starts N processes of `python -m lorasync train ...` on this
machine with a free rendezvous port (`--standalone`), gives each its RANK, WORLD_SIZE and
LOCAL_RANK, and stops the others when one fails (`--max-restarts 0`: a data-parallel run has
no use for a rank restarted alone). Each process is then the command a user could have
started under torchrun themselves (docs/distributed.md).
"""

from __future__ import annotations

import sys


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's ranks."""
    import os

    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lorasync ARGV...` on `nproc` ranks; 0 when all succeed, else 1 with torchrun's
    report of the first failure (the rank, its exit code, its error) on stderr."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--nproc-per-node", str(nproc), "--standalone", "--max-restarts", "0", "-m", "lorasync", *argv]
    )
    try:
        run(args)
    except ChildFailedError as err:
        print(f"lorasync train: error: a rank failed:\n{err.format_msg()}", file=sys.stderr)
        return 1
    return 0
