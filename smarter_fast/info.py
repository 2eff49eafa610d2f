"""`python -m smarter_fast.info`: versions, the C++ extension, and every op x backend.

One line per op and backend, `<op> <backend> available` or `<op> <backend> unavailable:
<reason>` (docs/design.md, "Op dispatch"). Exits 0 whenever the package imports.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m smarter_fast.info", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from .diagnostics.environment import report

    for line in report():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
