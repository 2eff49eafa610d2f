"""`python -m smarter_fast.info`: versions, the C++ extension, and every op x backend.

One line per op and backend, `<op> <backend> available` or `<op> <backend> unavailable:
<reason>` (docs/design.md, "Op dispatch"). Exits 0 whenever the package imports.
"""

from __future__ import annotations

import sys


def main() -> int:
    from .diagnostics.environment import report

    for line in report():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
