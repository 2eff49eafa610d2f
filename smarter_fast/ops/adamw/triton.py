"""Triton AdamW: one launch over flat fp32 buffers, CS224N minBERT semantics.

Per element (28 bytes of traffic: read p, g, m, v; write p, m, v):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - step_size * m / (sqrt(v) + eps),  step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    p = p - lr * weight_decay * p             (decoupled, after the update)

Two entry points:
- `adamw_step_(..., step: int, ...)`: the registry's signature; the step size is computed on
  the host in double precision and passed as a scalar.
- `adamw_step_tensor_(..., step: Tensor, ...)`: graph-capturable; `step` (and optionally `lr`)
  are device tensors read by the kernel, which computes beta^t and the bias corrections on the
  device (float64 arithmetic, so they match the host formula) - no host synchronisation, so a
  CUDA graph can replay it. The caller increments `step` (it holds the current step, from 1).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..triton_support import (TRITON_ERROR, availability, skip_launch, tl, triton,  # noqa: F401
                              triton_op, wrap_triton)
from .ref import cast_into_copy as _cast_into_copy
from .ref import step_size as _host_step_size

_BLOCK = 1024
_NUM_WARPS = 4


def check(param, grad, exp_avg, exp_avg_sq, **_):
    reasons = []
    bad = [n for n, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg),
                          ("exp_avg_sq", exp_avg_sq)) if not t.is_contiguous()]
    if bad:
        reasons.append(f"needs contiguous {', '.join(bad)}")
    if not (param.numel() == grad.numel() == exp_avg.numel() == exp_avg_sq.numel()):
        reasons.append("param, grad, exp_avg, exp_avg_sq differ in size")
    if param.numel() >= 2**31:
        reasons.append("more than 2^31 elements (32-bit offsets)")
    return reasons


def _split(x: float) -> tuple[float, float]:
    """x as hi + lo, both fp32-representable: the kernel rebuilds a ~48-bit value in float64
    (Triton passes Python floats as fp32)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(x - hi)


if TRITON_ERROR is None:

    @triton.jit
    def _adamw_kernel(P, G, M, V, n, step_size, beta1, one_minus_beta1, beta2,
                      one_minus_beta2, eps, decay, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(P + offs, mask=mask)
        g = tl.load(G + offs, mask=mask).to(tl.float32)
        m = tl.load(M + offs, mask=mask)
        v = tl.load(V + offs, mask=mask)
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + one_minus_beta2 * (g * g)
        p = p - step_size * (m / (tl.sqrt(v) + eps))
        p = p + p * decay  # decay = -lr * weight_decay: decoupled, after the update
        tl.store(P + offs, p, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)

    @triton.jit
    def _adamw_device_step_kernel(P, G, M, V, STEP, LR, n, lr_value, beta1, one_minus_beta1,
                                  beta1_hi, beta1_lo, beta2, one_minus_beta2, beta2_hi,
                                  beta2_lo, eps, weight_decay, BLOCK: tl.constexpr,
                                  LR_IS_TENSOR: tl.constexpr, CORRECT_BIAS: tl.constexpr):
        # Scalars first: every program recomputes them (a few dozen float64 multiplies).
        if LR_IS_TENSOR:
            lr = tl.load(LR).to(tl.float64)
        else:
            lr = tl.cast(lr_value, tl.float64)
        if CORRECT_BIAS:
            t = tl.load(STEP).to(tl.int64)
            b1 = tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64)
            b2 = tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64)
            pow1 = b1 * 0.0 + 1.0
            pow2 = b2 * 0.0 + 1.0
            for _ in range(0, 63):  # beta^t by squaring: exact in float64, no transcendental
                bit = (t & 1) != 0
                pow1 = tl.where(bit, pow1 * b1, pow1)
                pow2 = tl.where(bit, pow2 * b2, pow2)
                b1 = b1 * b1
                b2 = b2 * b2
                t = t >> 1
            step_size = (lr * tl.sqrt(1.0 - pow2) / (1.0 - pow1)).to(tl.float32)
        else:
            step_size = lr.to(tl.float32)
        decay = (-(lr * weight_decay)).to(tl.float32)

        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(P + offs, mask=mask)
        g = tl.load(G + offs, mask=mask).to(tl.float32)
        m = tl.load(M + offs, mask=mask)
        v = tl.load(V + offs, mask=mask)
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + one_minus_beta2 * (g * g)
        p = p - step_size * (m / (tl.sqrt(v) + eps))
        p = p + p * decay
        tl.store(P + offs, p, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)

    @triton_op("smarter_fast_triton::adamw_step_",
               mutates_args={"param", "exp_avg", "exp_avg_sq"})
    def _adamw_op(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, step_size: float, beta1: float, beta2: float,
                  eps: float, decay: float) -> None:
        n = param.numel()
        if n == 0 or skip_launch(param):
            return
        wrap_triton((_adamw_kernel))[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, n, step_size, beta1, 1.0 - beta1, beta2,
            1.0 - beta2, eps, decay, BLOCK=_BLOCK, num_warps=_NUM_WARPS)

    @triton_op("smarter_fast_triton::adamw_step_tensor_",
               mutates_args={"param", "exp_avg", "exp_avg_sq"})
    def _adamw_tensor_op(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                         exp_avg_sq: torch.Tensor, step: torch.Tensor,
                         lr_tensor: Optional[torch.Tensor], lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float,
                         correct_bias: bool) -> None:
        n = param.numel()
        if n == 0 or skip_launch(param):
            return
        b1_hi, b1_lo = _split(beta1)
        b2_hi, b2_lo = _split(beta2)
        lr_is_tensor = lr_tensor is not None
        wrap_triton((_adamw_device_step_kernel))[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, step, lr_tensor if lr_is_tensor else step,
            n, lr, beta1, 1.0 - beta1, b1_hi, b1_lo, beta2, 1.0 - beta2, b2_hi, b2_lo, eps,
            weight_decay, BLOCK=_BLOCK, LR_IS_TENSOR=lr_is_tensor,
            CORRECT_BIAS=bool(correct_bias), num_warps=_NUM_WARPS)


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                correct_bias=True, copy=None, copy_offset=0):
    """The registry's entry. `step` may be an int (step size computed on the host) or a device
    tensor (see adamw_step_tensor_). A bf16 `copy` is cast after the update, not in the kernel
    (only the CPU kernel fuses it)."""
    if isinstance(step, torch.Tensor) or isinstance(lr, torch.Tensor):
        adamw_step_tensor_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps,
                           weight_decay, step, correct_bias)
    else:
        ss = _host_step_size(float(lr), float(beta1), float(beta2), int(step), bool(correct_bias))
        torch.ops.smarter_fast_triton.adamw_step_(param, grad, exp_avg, exp_avg_sq, float(ss),
                                                  float(beta1), float(beta2), float(eps),
                                                  -float(lr) * float(weight_decay))
    _cast_into_copy(param, copy, copy_offset)


def adamw_step_tensor_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                       step, correct_bias=True):
    """Graph-capturable step: `step` is a 1-element tensor on param's device (int or float,
    holding the current step, counting from 1); `lr` a float or such a tensor. Nothing is read
    back to the host."""
    if not isinstance(step, torch.Tensor):
        step = torch.tensor(int(step), device=param.device)
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    torch.ops.smarter_fast_triton.adamw_step_tensor_(
        param, grad, exp_avg, exp_avg_sq, step, lr_tensor, lr_value, float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(correct_bias))
