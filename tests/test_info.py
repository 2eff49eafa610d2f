"""`python -m smarter_fast.info`: one line per op and backend (docs/design.md, "Op dispatch")."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPS = ("attention", "attention_varlen", "adamw", "smart_noise", "smart_mse")
LINE = re.compile(r"^(\S+) (triton|cpp|ref) (available|unavailable: .+)$")


def run_info(**env):
    full = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "smarter_fast.info"], cwd=REPO, env=full,
                          text=True, capture_output=True, timeout=600)


def backend_lines(stdout):
    found = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            found[(m.group(1), m.group(2))] = m.group(3)
    return found


def test_info_lists_every_op_and_backend():
    out = run_info()
    assert out.returncode == 0, out.stderr
    found = backend_lines(out.stdout)
    assert set(found) == {(o, b) for o in OPS for b in ("triton", "cpp", "ref")}
    assert all(found[(o, "ref")] == "available" for o in OPS)
    assert "capability flags" in out.stdout
    assert re.search(r"^--precision auto -> (fp32|bf16): ", out.stdout, re.M)


def test_info_reports_cpp_kernels_when_the_extension_loads():
    from smarter_fast.ops import extension as _ext

    if not _ext.load().loaded:
        pytest.skip(f"extension unavailable here: {_ext.load().error}")
    found = backend_lines(run_info().stdout)
    for op in ("adamw", "smart_noise", "smart_mse"):
        assert found[(op, "cpp")] == "available"


def test_info_without_extension_says_why_and_exits_0():
    out = run_info(SMARTER_FAST_NO_EXT="1")
    assert out.returncode == 0
    found = backend_lines(out.stdout)
    assert found[("smart_mse", "cpp")] == "unavailable: disabled by SMARTER_FAST_NO_EXT=1"


def test_info_triton_interpreter_counts_as_available_on_cpu():
    pytest.importorskip("triton")
    out = run_info(TRITON_INTERPRET="1")
    found = backend_lines(out.stdout)
    assert "no CUDA device" not in " ".join(found[(o, "triton")] for o in OPS)
