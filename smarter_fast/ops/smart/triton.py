"""Triton SMART kernels: not written yet (issue 6); the registry reports them unavailable."""

from ..registry import triton_availability


def availability():
    why = triton_availability()
    return why or "no Triton kernel for this op yet"
