"""`python -m smarter_fast.data fetch [--to DIR] [--mirror BASE_URL]`: the CS224N data files from
the course repository at a pinned commit, verified by checksum (smarter_fast/data/fetch.py), into
the directory `python -m smarter_fast.train` reads without --data-dir.
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse

from .fetch import COMMIT, DEFAULT_DIR, DEFAULT_MIRROR, REPOSITORY, TIMEOUT, fetch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smarter_fast.data",
                                description="Data commands of smarter_fast.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    f = commands.add_parser(
        "fetch", help="download the CS224N data files, verified by checksum",
        description=(f"Download the CS224N default-project data files (SST, Quora, STS: train, dev, "
                     f"test-student) from {REPOSITORY} at commit {COMMIT}, check each against its git "
                     f"blob SHA-1 and move it into place. An interrupted download is resumed by the next "
                     f"run; files already present and verified are skipped."))
    f.add_argument("--to", metavar="DIR", default=DEFAULT_DIR,
                   help=f"directory for the files; training reads ./{DEFAULT_DIR} when --data-dir is not "
                        f"given (default: {DEFAULT_DIR})")
    f.add_argument("--mirror", metavar="BASE_URL", default=None,
                   help=f"fetch each file from BASE_URL/<name> instead (default: {DEFAULT_MIRROR})")
    f.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS",
                   help=f"seconds without an answer before a connection counts as lost (default: {TIMEOUT:g})")
    f.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a progress bar per file, on stderr)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.mirror is not None and not urllib.parse.urlsplit(args.mirror).scheme:
        p.error(f"--mirror must be a URL such as https://host/path/, got {args.mirror!r}")
    if args.timeout <= 0:
        p.error(f"--timeout must be positive, got {args.timeout:g}")
    result = fetch(args.to, args.mirror, timeout=args.timeout, progress=not args.no_progress,
                   say=lambda line: print(line, flush=True))
    if result.unreachable:
        print(f"error: {result.unreachable}", file=sys.stderr)
        return 1
    if result.problems:
        names = [*result.corrupt, *result.partial, *result.failed]
        print(f"error: {len(names)} file(s) not fetched: {', '.join(names)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
