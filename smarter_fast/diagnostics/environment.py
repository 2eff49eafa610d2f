"""The environment `python -m smarter_fast.info` reports: versions, the C++ extension, the
precision `auto` picks, and every op x backend, available or why not (docs/design.md, "Op
dispatch")."""

from __future__ import annotations

import platform


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                              "avx512_bf16", "amx_bf16"]
                    return " ".join(w for w in wanted if w in flags) or "none of avx2/avx512"
    except OSError:
        pass
    return "unknown"


def report() -> list[str]:
    import torch

    from .. import __version__
    from ..ops import extension as _ext
    from ..ops import OPS
    from ..ops.registry import ENV_VAR, resolve_request, triton_interpret

    lines = [
        f"smarter_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"machine {platform.machine()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}"
                     + (" (TRITON_INTERPRET=1: kernels run on CPU)" if triton_interpret() else ""))
    except ImportError:
        lines.append("triton not installed")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"cuda device: {cuda}")
    lines.append(f"cpu: {torch.get_num_threads()} threads; capability flags: {cpu_flags()}")
    from ..precision import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines.append(resolve_precision("auto", device)[1].replace("precision auto", "--precision auto", 1))
    status = _ext.load()
    if status.loaded:
        lines.append(f"extension: {status.mode} ({status.path}); "
                     f"cpu kernels vectorised for {_ext.kernel_variant()}")
    else:
        lines.append(f"extension: not loaded: {status.error}")
    for note in status.notes[:1]:
        lines.append(f"  note: {note.splitlines()[0]}")
    try:
        default = resolve_request(None)
    except ValueError as e:
        default = f"invalid ({e})"
    lines.append(f"default backend: {default} (set {ENV_VAR} or --backend to force one)")
    from importlib import import_module

    lines.append("triton attention in fp32: " + import_module("smarter_fast.ops.attention.triton").fp32_mode())
    for name in ("attention", "attention_varlen", "adamw", "smart_noise", "smart_mse"):
        for backend in OPS[name].ordered():
            why = backend.availability()
            lines.append(f"{name} {backend.name} " + ("available" if why is None
                                                      else f"unavailable: {why}"))
    return lines
