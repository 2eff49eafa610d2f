"""The fused AdamW step (CS224N minBERT semantics) that smarter_fast.optim.AdamW runs."""

import torch

from ..registry import Backend, FLOAT_DTYPES, any_device, cpu_only, op, triton_devices
from . import cpp, ref, triton

ADAMW = op("adamw")
ADAMW.register(Backend("triton", triton.adamw_step_, triton_devices, (torch.float32,),
                       triton.availability, triton.check))
ADAMW.register(Backend("cpp", cpp.adamw_step_, cpu_only, (torch.float32,), cpp.availability,
                       cpp.check))
ADAMW.register(Backend("ref", ref.adamw_step_, any_device, FLOAT_DTYPES, lambda: None))


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                exp_avg_sq: torch.Tensor, *, lr: float, beta1: float = 0.9,
                beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
                step: int, correct_bias: bool = True, copy: torch.Tensor | None = None,
                copy_offset: int = 0, backend: str = "auto") -> None:
    """One AdamW step in place on `param`, `exp_avg` and `exp_avg_sq` (any shape, typically
    the optimizer's flat buffers). `step` counts from 1. Bias correction as in CS224N minBERT:
    step size lr * sqrt(1 - beta2^t) / (1 - beta1^t); decoupled weight decay after the update.

    `copy` (optional, contiguous bfloat16): also set copy[j] = updated param.flatten()[copy_offset
    + j] cast as torch casts (round to nearest even). The C++ kernel writes it in the same pass,
    saving the separate cast's read of param; the other backends cast after the update."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:  # the reference would broadcast silently
            raise ValueError(f"adamw_step_: {name} has shape {tuple(t.shape)}, param "
                             f"{tuple(param.shape)}; they must be the same")
    if int(step) < 1:
        raise ValueError(f"adamw_step_: step counts from 1, got {step}")
    if copy is not None:
        _check_copy(param, copy, copy_offset)
    impl = ADAMW.select(backend, (param, grad, exp_avg, exp_avg_sq))
    impl.fn(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
            correct_bias, copy=copy, copy_offset=int(copy_offset))


def _check_copy(param, copy, copy_offset) -> None:
    if copy.dtype != torch.bfloat16 or not copy.is_contiguous() or copy.device != param.device:
        raise ValueError(f"adamw_step_: copy must be a contiguous bfloat16 tensor on "
                         f"{param.device}, got {copy.dtype} on {copy.device}"
                         + ("" if copy.is_contiguous() else " (not contiguous)"))
    if not 0 <= copy_offset <= param.numel() - copy.numel():
        raise ValueError(f"adamw_step_: a copy of {copy.numel()} elements at offset "
                         f"{copy_offset} does not fit in param's {param.numel()}")


__all__ = ["adamw_step_"]
