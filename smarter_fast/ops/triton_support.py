"""What the Triton backends share: the optional import, and the interpreter's rules.

Triton decides at import whether @triton.jit compiles for the GPU or runs in its CPU interpreter
(its own library functions too), so TRITON_INTERPRET must be set before Python imports Triton; a
later change cannot take effect and is reported by `availability()`.
"""

from __future__ import annotations

from .registry import triton_availability, triton_interpret

try:  # the package imports (and reports why) without Triton
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    TRITON_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    triton = tl = triton_op = wrap_triton = None
    TRITON_ERROR = f"Triton is not usable: {e}"

INTERPRET_AT_IMPORT = triton_interpret()


def mode_mismatch() -> str | None:
    if triton_interpret() == INTERPRET_AT_IMPORT:
        return None
    if INTERPRET_AT_IMPORT:
        return "Triton was loaded for its interpreter (TRITON_INTERPRET=1 at import)"
    return ("TRITON_INTERPRET=1 was set after Triton was imported; set it before starting "
            "Python to run the Triton kernels on CPU")


def skip_launch(t) -> bool:
    """Under the interpreter, triton_op's generated fake implementation would run the kernel on
    FakeTensors (wrap_triton only intercepts compiled kernels): skip the launch there."""
    if not triton_interpret():
        return False
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def availability() -> str | None:
    """None when the Triton kernels can run here, else why not."""
    return TRITON_ERROR or triton_availability() or mode_mismatch()
