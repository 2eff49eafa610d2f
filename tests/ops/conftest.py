"""The Triton kernels' CPU tests run in Triton's interpreter.

Triton picks interpreter or GPU compilation when it is imported, so those tests need
TRITON_INTERPRET=1 from the start. A test module marks itself with
`NEEDS_TRITON_INTERPRETER = True`; without the variable its tests skip, and its
`test_in_interpreter_subprocess` (which calls the `rerun_in_interpreter` fixture) reruns the
whole file in a subprocess that has it, so a plain `pytest` still tests every kernel.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SUBPROCESS_TEST = "test_in_interpreter_subprocess"


@pytest.fixture(autouse=True)
def _triton_interpreter_only(request, monkeypatch):
    if not getattr(request.module, "NEEDS_TRITON_INTERPRETER", False):
        return
    if request.node.name.startswith(SUBPROCESS_TEST):
        return
    if not INTERPRETING:
        pytest.skip(f"needs TRITON_INTERPRET=1 at start-up; covered by {SUBPROCESS_TEST}")
    monkeypatch.delenv("SMARTER_FAST_BACKEND", raising=False)


@pytest.fixture
def rerun_in_interpreter():
    """Call with a test file's path: runs it under TRITON_INTERPRET=1 and asserts it passes."""
    if INTERPRETING:
        pytest.skip("already running in the interpreter")

    def run(path: str) -> None:
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        env.pop("SMARTER_FAST_BACKEND", None)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]

    return run
