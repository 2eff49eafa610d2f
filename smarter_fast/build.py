"""`python -m smarter_fast.build`: compile the C++ extension now and report what was built.

Useful after `pip install -e .` under build isolation (the default), where the extension is
otherwise compiled on first use. Exits 1 with the compiler's output if the build fails.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smarter_fast.build", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    from .ops import extension as _ext

    try:
        from . import _C  # noqa: F401
        print(f"prebuilt extension found: {_C.__file__}")
    except ImportError:
        pass
    try:
        status = _ext.build(verbose=args.verbose)
    except Exception as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    import torch

    variants = ", ".join(_ext.caps.variant_names())
    print(f"built variants {variants} in {status.path}")
    print(f"this CPU runs the {torch.ops.smarter_fast.kernel_variant()} kernels")
    names = torch._C._dispatch_get_all_op_names()
    for label, namespace in (("operators", "smarter_fast"),
                             ("test-only operators", "smarter_fast_testing")):
        ops = sorted(n.split("::", 1)[1] for n in names if n.startswith(namespace + "::"))
        print(f"{label} ({namespace}): {', '.join(ops)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
