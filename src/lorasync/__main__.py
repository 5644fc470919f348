"""`python -m lorasync`: the `lorasync` command line."""

import sys

from lorasync.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
