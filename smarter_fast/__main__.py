"""`python -m smarter_fast COMMAND [ARGS ...]`: the `smarter-fast` command (smarter_fast/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m smarter_fast"))
