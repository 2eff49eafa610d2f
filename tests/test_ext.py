"""Loading the C++ extension: prebuilt, built on first use (JIT), and unavailable."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import torch
from smarter_fast import ops
from smarter_fast.ops import extension as _ext
s = _ext.load()
print("MODE", s.mode, s.loaded)
a, b = torch.randn(5, 3), torch.randn(5, 3)
print("AUTO", ops.OPS["smart_mse"].select("auto", (a, b)).name)
try:
    ops.smart_mse(a, b, backend="cpp")
    print("CPP ok")
except ops.BackendUnavailableError as e:
    print("CPP raised", e)
"""


def run_python(code, env_extra, cwd=REPO, pythonpath=REPO):
    env = dict(os.environ, PYTHONPATH=str(pythonpath), **env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def test_unavailable_without_compiler_falls_back_to_ref(tmp_path):
    out = run_python(PROBE, {"SMARTER_FAST_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/c++"})
    assert out.returncode == 0, out.stderr
    if "MODE prebuilt" in out.stdout:
        pytest.skip("a prebuilt smarter_fast._C is installed, so no build is attempted")
    assert "MODE none False" in out.stdout
    assert "AUTO ref" in out.stdout
    assert "backend 'cpp' was requested" in out.stdout and "no C++ compiler" in out.stdout
    # One clear message, once.
    assert out.stderr.count("C++ extension not built: no C++ compiler found") == 1


def test_disabled_by_environment():
    out = run_python(PROBE, {"SMARTER_FAST_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert "MODE none False" in out.stdout and "AUTO ref" in out.stdout
    assert "disabled by SMARTER_FAST_NO_EXT=1" in out.stdout


@pytest.mark.slow
def test_jit_build_once_then_cached(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    env = {"SMARTER_FAST_CACHE_DIR": str(tmp_path)}
    first = run_python(PROBE, env)
    assert first.returncode == 0, first.stderr
    if "MODE prebuilt" in first.stdout:
        pytest.skip("a prebuilt smarter_fast._C is installed, so nothing is JIT-built")
    assert "MODE jit True" in first.stdout and "AUTO cpp" in first.stdout
    assert first.stderr.count("compiling the C++ kernels") == 1
    assert str(tmp_path) in first.stderr
    second = run_python(PROBE, env)
    assert "MODE jit True" in second.stdout
    assert "compiling the C++ kernels" not in second.stderr  # cached


@pytest.mark.slow
def test_prebuilt_extension_is_used(tmp_path):
    """`setup.py build_ext` (what `pip install --no-build-isolation` runs) gives an importable
    smarter_fast._C that is preferred over the JIT build."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    copy = tmp_path / "src"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "__pycache__", "runs", ".benchmarks", "*.egg-info"))
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=copy, text=True, capture_output=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    out = run_python(PROBE + "print('VARIANT', _ext.kernel_variant())",
                     {"SMARTER_FAST_CACHE_DIR": str(tmp_path / "cache")},
                     cwd=copy, pythonpath=copy)
    assert out.returncode == 0, out.stderr
    assert "MODE prebuilt True" in out.stdout and "AUTO cpp" in out.stdout
    assert "compiling" not in out.stderr


def test_failing_compiler_names_its_error_once(tmp_path):
    """A compiler that fails used to leave an empty reason ("compiling the CPU kernels failed:")."""
    fake = tmp_path / "bin" / "fakecxx"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fakecxx: error: this compiler refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = run_python(PROBE, {"SMARTER_FAST_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(fake)})
    assert out.returncode == 0, out.stderr
    if "MODE prebuilt" in out.stdout:
        pytest.skip("a prebuilt smarter_fast._C is installed, so no build is attempted")
    assert "AUTO ref" in out.stdout
    line = [x for x in out.stderr.splitlines() if "C++ extension not built" in x]
    assert len(line) == 1 and "error" in line[0].split("failed:", 1)[1], out.stderr


def test_unwritable_cache_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run_python(PROBE, {"SMARTER_FAST_CACHE_DIR": str(blocker / "cache")})
    assert out.returncode == 0, out.stderr
    if "MODE prebuilt" in out.stdout:
        pytest.skip("a prebuilt smarter_fast._C is installed, so no build is attempted")
    assert "cannot write the build cache" in out.stderr and "SMARTER_FAST_CACHE_DIR" in out.stderr


def test_backend_forced_by_the_environment_is_named(tmp_path):
    code = """
import torch
from smarter_fast import ops
try:
    ops.smart_mse(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
except ops.BackendUnavailableError as e:
    print("RAISED", e)
"""
    out = run_python(code, {"SMARTER_FAST_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/c++",
                            "SMARTER_FAST_BACKEND": "cpp"})
    assert out.returncode == 0, out.stderr
    assert "RAISED" in out.stdout and "(by SMARTER_FAST_BACKEND=cpp)" in out.stdout
    if "no C++ compiler" in out.stderr:  # the build was attempted: the startup line says what follows
        assert "SMARTER_FAST_BACKEND=cpp asks for it, so the ops will fail" in out.stderr


def test_test_only_ops_live_outside_the_production_namespace():
    import torch

    from smarter_fast.ops import extension as _ext

    if not _ext.load().loaded:
        pytest.skip(f"extension unavailable here: {_ext.load().error}")
    for name in ("attention_dropout_mask", "dropout_add_layer_norm_mask"):
        assert hasattr(torch.ops.smarter_fast_testing, name)
        assert not hasattr(torch.ops.smarter_fast, name)
    ops = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("smarter_fast::")}
    assert {"smarter_fast::kernel_variant", "smarter_fast::smart_mse", "smarter_fast::adamw_step_",
            "smarter_fast::attention_fwd", "smarter_fast::attention_varlen_bwd",
            "smarter_fast::dropout_add_layer_norm_backward"} <= ops
    m = torch.ops.smarter_fast_testing.dropout_add_layer_norm_mask(1000, 0.5, 3)
    assert m.shape == (1000,) and set(m.unique().tolist()) == {0.0, 2.0}
