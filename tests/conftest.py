"""Shared fixtures."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cs224n"


@pytest.fixture
def skip_unless_cpp():
    """Call with an op name: skips the test, with the reason, when its C++ kernels can't run."""
    from smarter_fast.ops import OPS

    def check(op_name: str) -> None:
        why = OPS[op_name].backends["cpp"].availability()
        if why is not None:
            pytest.skip(f"cpp backend of {op_name} unavailable: {why}")

    return check
