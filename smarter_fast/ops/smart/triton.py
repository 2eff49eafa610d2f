"""Triton SMART kernels: in-kernel Philox noise and the fused mean-squared term.

- `smart_noise(x, sigma, seed)`: y = x + sigma * z with z drawn by `tl.randn(seed, offset)`
  (Philox4x32-10 keyed by the seed, counter = the element's flat index). The noise is never
  stored: the backward pass is the identity in x, and the same (seed, shape) redraws the same
  noise. The stream differs from torch.randn's (same seed, same *backend* gives the same noise).
- `smart_mse(a, b)`: mean((a - b)^2) in a deterministic two-stage reduction (fp32 block
  partial sums, then one program sums them in a fixed order); the backward computes
  grad_a = 2 g (a - b) / n and grad_b = -grad_a in one kernel, reading g on the device.

Both are `torch.library.triton_op`s (namespace smarter_fast_triton, the C++ extension owns
smarter_fast) with `register_autograd`; under TRITON_INTERPRET=1 they run on CPU tensors.
"""

from __future__ import annotations

import torch

from ..triton_support import (TRITON_ERROR, availability, skip_launch, tl, triton,  # noqa: F401
                              triton_op, wrap_triton)


_NOISE_BLOCK = 1024
_MSE_BLOCK = 4096
_FINAL_BLOCK = 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(*tensors, **_):
    reasons = []
    for t in tensors:
        if t.numel() >= 2**31:
            reasons.append("more than 2^31 elements (32-bit offsets)")
            break
    return reasons


def mse_check(a, b, **_):
    return check(a, b) + (["empty inputs"] if a.numel() == 0 else [])


if TRITON_ERROR is None:

    @triton.jit(do_not_specialize=["seed"])
    def _noise_kernel(X, Y, n, sigma, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.randn(seed, offs)  # Philox: a pure function of (seed, offset), nothing stored
        tl.store(Y + offs, (x + sigma * z).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _mse_partial_kernel(A, B, PART, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        d = a - b
        tl.store(PART + pid, tl.sum(d * d, axis=0))

    @triton.jit
    def _mse_final_kernel(PART, OUT, n_part, inv_n, BLOCK: tl.constexpr):
        # One program, fixed summation order: the result does not depend on scheduling.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_part, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(PART + offs, mask=offs < n_part, other=0.0)
        tl.store(OUT, (tl.sum(acc, axis=0) * inv_n).to(OUT.dtype.element_ty))

    @triton.jit
    def _mse_backward_kernel(G, A, B, GA, GB, n, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G).to(tl.float32) * scale  # 2 g / n, g read on the device (no sync)
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        ga = g * (a - b)
        tl.store(GA + offs, ga.to(GA.dtype.element_ty), mask=mask)
        tl.store(GB + offs, (-ga).to(GB.dtype.element_ty), mask=mask)

    @triton_op("smarter_fast_triton::smart_noise", mutates_args=())
    def _smart_noise_op(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        if n and not skip_launch(x):
            wrap_triton((_noise_kernel))[(triton.cdiv(n, _NOISE_BLOCK),)](
                x, y, n, sigma, seed, BLOCK=_NOISE_BLOCK)
        return y

    def _noise_backward(ctx, grad):
        return grad, None, None  # x + sigma * z: the identity in x

    _smart_noise_op.register_autograd(_noise_backward)

    @triton_op("smarter_fast_triton::smart_mse", mutates_args=())
    def _smart_mse_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        n = a.numel()
        n_part = triton.cdiv(n, _MSE_BLOCK)
        part = torch.empty(n_part, device=a.device, dtype=torch.float32)
        out = torch.empty((), device=a.device, dtype=a.dtype)
        if skip_launch(a):
            return out
        wrap_triton((_mse_partial_kernel))[(n_part,)](a, b, part, n, BLOCK=_MSE_BLOCK)
        wrap_triton((_mse_final_kernel))[(1,)](part, out, n_part, 1.0 / n,
                                                     BLOCK=_FINAL_BLOCK)
        return out

    @triton_op("smarter_fast_triton::smart_mse_backward", mutates_args=())
    def _smart_mse_backward_op(grad: torch.Tensor, a: torch.Tensor,
                               b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = a.contiguous(), b.contiguous()
        n = a.numel()
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        if skip_launch(a):
            return grad_a, grad_b
        wrap_triton((_mse_backward_kernel))[(triton.cdiv(n, _NOISE_BLOCK),)](
            grad, a, b, grad_a, grad_b, n, 2.0 / n, BLOCK=_NOISE_BLOCK)
        return grad_a, grad_b

    def _mse_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _mse_backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.ops.smarter_fast_triton.smart_mse_backward(grad, a, b)

    _smart_mse_op.register_autograd(_mse_backward, setup_context=_mse_setup)


def smart_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    # Philox takes a 64-bit key; keep the seed non-negative so every int maps to one stream.
    return torch.ops.smarter_fast_triton.smart_noise(x, float(sigma),
                                                     int(seed) & 0x7FFF_FFFF_FFFF_FFFF)


def smart_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.smarter_fast_triton.smart_mse(a, b)
