"""Backend records and selection for the hot ops (docs/design.md, "Op dispatch").

Each op has up to three backends with one signature: `triton` (CUDA, or CPU under
TRITON_INTERPRET=1), `cpp` (smarter_fast._C) and `ref` (plain PyTorch, always works). Automatic
choice takes the first in that order with no reasons against it and logs the choice once, with
the reasons the others were passed over; an explicit request that cannot be met raises, listing
every reason. Selection looks only at static facts (device, dtype, shape limits, availability).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

log = logging.getLogger("smarter_fast")

BACKEND_NAMES = ("triton", "cpp", "ref")
ENV_VAR = "SMARTER_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_request(backend: str | None) -> str:
    """`auto` (or None) defers to SMARTER_FAST_BACKEND, which itself defaults to auto."""
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "backend argument"
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r} from the {source}; "
                         f"expected one of: auto, {', '.join(BACKEND_NAMES)}")
    return backend


@dataclass(frozen=True)
class Backend:
    """One implementation of an op and what it can run."""

    name: str
    fn: Callable
    devices: Callable[[], tuple[str, ...]]  # device types it runs on (may depend on env)
    dtypes: tuple[torch.dtype, ...]
    availability: Callable[[], str | None]  # None when usable, else why not
    check: Callable[..., list[str]] | None = None  # op-specific limits (shapes, options)

    def is_available(self) -> bool:
        return self.availability() is None

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor], **options) -> list[str]:
        why = self.availability()
        if why is not None:
            return [why]
        reasons = []
        devices = self.devices()
        for t in tensors:
            if t.device.type not in devices:
                reasons.append(f"runs on {'/'.join(devices)}, not {t.device.type}")
                break
        for t in tensors:
            if t.dtype not in self.dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
                reasons.append(f"supports {names}, not {str(t.dtype).replace('torch.', '')}")
                break
        if self.check is not None and not reasons:
            reasons += self.check(*tensors, **options)
        return reasons


class Op:
    """The backends of one op, in priority order, and the choice among them."""

    def __init__(self, name: str):
        self.name = name
        self.backends: dict[str, Backend] = {}
        self._logged: set = set()

    def register(self, backend: Backend) -> Backend:
        self.backends[backend.name] = backend
        return backend

    def ordered(self) -> list[Backend]:
        return [self.backends[n] for n in BACKEND_NAMES if n in self.backends]

    def select(self, backend: str | None, tensors: Sequence[torch.Tensor], **options) -> Backend:
        request = resolve_request(backend)
        if request != "auto" and request not in self.backends:
            # A request for the whole model (--backend triton) reaches ops that have no such
            # implementation at all (dropout_add_layer_norm has cpp and ref only): those choose
            # automatically, and say so once, instead of failing the run.
            if ("no-such", request) not in self._logged:
                self._logged.add(("no-such", request))
                log.info("%s: no %s backend; choosing automatically", self.name, request)
            request = "auto"
        if request != "auto":
            chosen = self.backends[request]
            reasons = chosen.not_supported_reasons(tensors, **options)
            if reasons:
                raise BackendUnavailableError(
                    f"{self.name}: backend {request!r} was requested"
                    + (f" (by {ENV_VAR}={request})" if backend in (None, "auto") else "")
                    + f" but cannot run these inputs: {'; '.join(reasons)}")
            return chosen
        passed_over = []
        for candidate in self.ordered():
            reasons = candidate.not_supported_reasons(tensors, **options)
            if not reasons and candidate.name == "triton" and _on_cpu(tensors):
                # The interpreter is orders of magnitude slower than the C++ or PyTorch paths: tests only.
                reasons = ["the Triton interpreter (TRITON_INTERPRET=1) runs CPU tensors only "
                           "when backend='triton' is requested explicitly"]
            if not reasons:
                self._log_choice(candidate.name, passed_over)
                return candidate
            passed_over.append((candidate.name, reasons))
        raise BackendUnavailableError(  # unreachable while ref supports everything
            f"{self.name}: no backend can run these inputs: "
            + "; ".join(f"{n}: {', '.join(r)}" for n, r in passed_over))

    def _log_choice(self, chosen: str, passed_over: list[tuple[str, list[str]]]) -> None:
        key = (chosen, tuple((n, tuple(r)) for n, r in passed_over))
        if key in self._logged:
            return
        self._logged.add(key)
        why = "; ".join(f"{n} passed over: {', '.join(r)}" for n, r in passed_over)
        log.info("%s: using the %s backend%s", self.name, chosen, f" ({why})" if why else "")


def _on_cpu(tensors: Sequence[torch.Tensor]) -> bool:
    return any(t.device.type == "cpu" for t in tensors)


OPS: dict[str, Op] = {}


def op(name: str) -> Op:
    """The Op record for `name`, created on first use."""
    if name not in OPS:
        OPS[name] = Op(name)
    return OPS[name]


# ---- availability shared by the backends -------------------------------------------------

_python_registrations_done: set = set()


def cpp_availability(schema_name: str,
                     register: Callable[[], None] | None = None) -> Callable[[], str | None]:
    """cpp is usable when the extension loaded and registered a CPU kernel for the op.
    `register` (the op's fake and autograd registrations, which need the C++ schema to exist)
    runs once, the first time the op is found usable."""

    def availability() -> str | None:
        from .extension import load

        status = load()
        if not status.loaded:
            return status.error or "C++ extension not loaded"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"smarter_fast::{schema_name}", "CPU"):
            return "no C++ kernel for this op in the loaded extension"
        if register is not None and register not in _python_registrations_done:
            _python_registrations_done.add(register)
            register()
        return None

    return availability


def triton_availability() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    if triton_interpret() or torch.cuda.is_available():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"


def triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if triton_interpret() else ("cuda",)


def cpu_only() -> tuple[str, ...]:
    return ("cpu",)


def any_device() -> tuple[str, ...]:
    return ("cpu", "cuda", "mps", "xpu", "meta")


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
