"""Loads the C++ extension (smarter_fast._C) once, building it on first use if needed.

Order: the ahead-of-time build from setup.py (`import smarter_fast._C`); else a just-in-time
build with ninja (torch.utils.cpp_extension.load) cached per torch version, Python version,
sources and flags; else nothing, with the reason kept for `smarter_fast.info` and the
registry's messages. Set SMARTER_FAST_NO_EXT=1 to skip the extension entirely and
SMARTER_FAST_CACHE_DIR to move the build cache (default ~/.cache/smarter_fast).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import capabilities as caps

_PKG = Path(__file__).resolve().parents[1]  # the smarter_fast package


@dataclass
class ExtensionStatus:
    loaded: bool = False
    mode: str = "none"  # "prebuilt", "jit", "none"
    path: str | None = None  # the shared library, or the build directory for JIT
    error: str | None = None  # why it is not loaded (None when loaded)
    notes: list[str] = field(default_factory=list)  # e.g. why the prebuilt module was not used


_status: ExtensionStatus | None = None
_lock = threading.Lock()


def source_dir() -> Path | None:
    """csrc/ beside the package (source checkout, editable install) or shipped inside it."""
    for candidate in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (candidate / "library.cpp").is_file():
            return candidate
    return None


def cache_root() -> Path:
    env = os.environ.get("SMARTER_FAST_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smarter_fast"


def _say(msg: str) -> None:
    print(f"smarter_fast: {msg}", file=sys.stderr, flush=True)


def _ops_registered() -> bool:
    import torch

    return hasattr(torch.ops, "smarter_fast") and hasattr(torch.ops.smarter_fast, "smart_mse")


def _try_prebuilt(status: ExtensionStatus) -> bool:
    try:
        from .. import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        status.notes.append(f"no prebuilt smarter_fast._C ({e})")
        return False
    status.mode, status.path = "prebuilt", getattr(_C, "__file__", None)
    return True


def _build_key(src: Path, variants: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    for f in sorted(src.rglob("*")):
        if f.suffix in (".cpp", ".h") and "tests" not in f.parts:
            h.update(str(f.relative_to(src)).encode())
            h.update(f.read_bytes())
    h.update(repr((caps.COMMON_FLAGS, [caps.variant_flags(v) for v in variants])).encode())
    h.update(os.environ.get("CXX", "c++").encode())
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return f"{tag}-{h.hexdigest()[:12]}"


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package ships the binary

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _compile_variants(src: Path, build_dir: Path, variants: list[str], cxx: str) -> list[str]:
    """Compiles csrc/kernels/capability_*.cpp once per CPU capability, each with its own -m
    flags (torch's load() applies one set of flags to every source), with a small ninja file."""
    import torch
    from torch.utils.cpp_extension import include_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    common = ["-fPIC", *caps.COMMON_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    common += [f"-I{p}" for p in include_paths()] + [f"-I{src}"]
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "",
    ]
    objects = []
    for name in variants:
        rel = caps.VARIANTS[name][0]
        source = src / Path(rel).relative_to("csrc")
        obj = build_dir / f"capability_{name.lower()}.o"
        flags = " ".join(common + caps.variant_flags(name))
        lines += [f"build {obj}: cxx {source}", f"  cflags = {flags}", ""]
        objects.append(str(obj))
    (build_dir / "variants.ninja").write_text("\n".join(lines))
    subprocess.run(
        ["ninja", "-f", "variants.ninja"], cwd=build_dir, check=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return objects


def build(verbose: bool = False) -> ExtensionStatus:
    """JIT-builds (or finds in the cache) the extension and loads it. Raises on failure."""
    import torch
    from torch.utils.cpp_extension import load

    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed with this copy")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH)")
    _ensure_ninja_on_path()
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja not found (pip install ninja)")
    variants = caps.variant_names()
    build_dir = cache_root() / "ext" / _build_key(src, variants)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / ".writable").touch()
    except OSError as e:
        raise RuntimeError(f"cannot write the build cache {build_dir} ({e.strerror or e}); set "
                           f"SMARTER_FAST_CACHE_DIR to a writable directory") from e
    library = build_dir / "smarter_fast_C.so"
    # One builder at a time (torchrun workers, parallel test runs share the cache). Not named
    # "lock": torch's load() uses that name for its own baton in the same directory.
    with open(build_dir / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not library.exists():
            _say(f"compiling the C++ kernels ({', '.join(variants)}) with ninja in {build_dir}; "
                 "this happens once per torch version and build flags")
        try:
            objects = _compile_variants(src, build_dir, variants, cxx)
            load(
                name="smarter_fast_C",
                sources=[str(src / Path(p).relative_to("csrc")) for p in caps.COMMON_SOURCES],
                extra_cflags=caps.COMMON_FLAGS + ["-fopenmp"] + caps.have_defines(variants),
                extra_include_paths=[str(src)],
                extra_ldflags=objects + ["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"compiling the CPU kernels failed:\n{(e.output or '')[-3000:]}")
        except OSError as e:  # a library in the cache that does not load (corrupt, foreign)
            raise RuntimeError(f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}; "
                               f"delete {build_dir} to build it again") from e
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    if not _ops_registered():
        raise RuntimeError(f"{library} loaded but registered no smarter_fast operators")
    return ExtensionStatus(True, "jit", str(build_dir))


def load() -> ExtensionStatus:
    """The extension's status, loading it on the first call (thread-safe, never raises)."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is not None:
            return _status
        status = ExtensionStatus()
        if os.environ.get("SMARTER_FAST_NO_EXT") == "1":
            status.error = "disabled by SMARTER_FAST_NO_EXT=1"
        elif _try_prebuilt(status):
            status.loaded = True
        else:
            try:
                built = build()
                status.loaded, status.mode, status.path = True, built.mode, built.path
            except Exception as e:  # compiler missing, build error, load error: fall back
                status.error = f"C++ extension not built: {_reason(e)}"
                status.notes.append(str(e))
                forced = os.environ.get("SMARTER_FAST_BACKEND") == "cpp"
                _say(f"{status.error}; "
                     + ("SMARTER_FAST_BACKEND=cpp asks for it, so the ops will fail: unset it to "
                        "run the pure-PyTorch backend" if forced else
                        "the pure-PyTorch backend takes over")
                     + " (`python -m smarter_fast.build` shows the full log)")
        _status = status
        return status


def _reason(error: Exception) -> str:
    """One line saying why the build failed: the error's first line, and when that is only a
    header ("compiling ... failed:"), the log's last line naming an error."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        named = [line for line in lines[1:] if "error" in line.lower() or line.startswith("FAILED")]
        first += " " + (named[-1] if named else lines[-1])
    elif first.endswith(":"):
        first += " (no compiler output)"
    return first


def kernel_variant() -> str | None:
    """DEFAULT, AVX2 or AVX512: which vectorised variant the CPU kernels run, if loaded."""
    if not load().loaded:
        return None
    import torch

    return torch.ops.smarter_fast.kernel_variant()

