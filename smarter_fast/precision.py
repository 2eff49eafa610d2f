"""`--device` and `--precision`: which device `auto` means, and bf16 autocast only where the
hardware runs bf16 matmuls natively.

bf16 pays on GPUs with bf16 support and on CPUs with AVX512-BF16 or AMX. Without them oneDNN
has no bf16 kernel and torch falls back to scalar code, an order of magnitude slower than fp32
(figures: benchmarks/README.md). So `auto` picks fp32 there, and an explicit bf16 on such a CPU is
run as asked but with a warning.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str | torch.device | None) -> torch.device:
    """`auto` (or None): the GPU when torch sees one, else the CPU. `cuda` without a visible GPU
    is an error that says why, rather than a failure deep inside the first kernel."""
    name = "auto" if requested is None else str(requested)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES[1:]:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device {name!r}: no CUDA GPU is visible (torch {torch.__version__} is "
                         f"{build}); use --device cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` runs bf16 matmuls natively, the reason in words)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"this GPU {'supports' if ok else 'does not support'} bfloat16"
    if device.type != "cpu":
        return False, f"no bf16 check for {device.type} devices"
    try:
        caps = torch.cpu.get_capabilities()
    except Exception as e:  # older or stripped builds: say so and stay on fp32
        return False, f"the CPU's capabilities are unknown ({type(e).__name__})"
    have = [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if caps.get(key)]
    if have:
        return True, f"this CPU has {' and '.join(have)}"
    return False, (f"this CPU ({caps.get('cpu_name', 'unknown')}) has neither AVX512-BF16 nor AMX: bf16 "
                   "matmuls fall back to scalar code, about 25-45x slower than fp32")


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """(precision to run, message to print or None). `auto` becomes bf16 where `device` runs it
    natively, else fp32; an explicit bf16 without native support stays bf16, with a warning."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; expected one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", None
    ok, why = native_bf16(device)
    if requested == "auto":
        chosen = "bf16" if ok else "fp32"
        return chosen, f"precision auto -> {chosen}: {why}"
    return "bf16", None if ok else f"warning: --precision bf16 on {device.type}: {why}; --precision fp32 is faster here"


__all__ = ["DEVICES", "PRECISIONS", "native_bf16", "resolve_device", "resolve_precision"]
