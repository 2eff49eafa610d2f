"""C++ fused dropout + residual add + LayerNorm (csrc/kernels/layernorm_impl.h): fake and
autograd registrations.

One pass forward (mask from Philox keyed by a seed drawn from torch's default generator, so
torch.manual_seed makes it reproducible; nothing of the mask is stored) and one pass backward
that regenerates the mask and reduces the LayerNorm weight and bias gradients. x and h may be
fp32 or bf16 (under autocast h is the bf16 Linear output and x the fp32 residual stream); the
output has their promoted dtype, the statistics and arithmetic are fp32.
"""

import torch

from ..registry import cpp_availability


def draw_seed() -> int:
    """A 62-bit seed from torch's default generator (drawn only when dropout_p > 0)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def register() -> None:
    """Fake and autograd registrations (the C++ schemas must exist first)."""

    @torch.library.register_fake("smarter_fast::dropout_add_layer_norm")
    def _(x, h, weight, bias, eps, dropout_p=0.0, seed=0):
        torch._check(x.shape == h.shape, lambda: "dropout_add_layer_norm: x and h shapes differ")
        out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, h.dtype))
        return out, x.new_empty(x.shape, dtype=torch.float32), \
            x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("smarter_fast::dropout_add_layer_norm_backward")
    def _(grad_out, xhat, rstd, weight, dropout_p, seed, x_dtype, h_dtype):
        H = xhat.shape[-1]
        return (xhat.new_empty(xhat.shape, dtype=x_dtype), xhat.new_empty(xhat.shape, dtype=h_dtype),
                xhat.new_empty((H,)), xhat.new_empty((H,)))

    def setup(ctx, inputs, output):
        x, h, weight, bias, eps, dropout_p, seed = inputs
        _, xhat, rstd = output
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.x_dtype, ctx.h_dtype = x.dtype, h.dtype
        ctx.mark_non_differentiable(xhat, rstd)

    def backward(ctx, grad_out, _grad_xhat, _grad_rstd):
        xhat, rstd, weight = ctx.saved_tensors
        gx, gh, gw, gb = torch.ops.smarter_fast.dropout_add_layer_norm_backward(
            grad_out, xhat, rstd, weight, ctx.dropout_p, ctx.seed, ctx.x_dtype, ctx.h_dtype)
        return gx, gh, gw, gb, None, None, None

    torch.library.register_autograd("smarter_fast::dropout_add_layer_norm", backward,
                                    setup_context=setup)


availability = cpp_availability("dropout_add_layer_norm", register)


class _Fn(torch.autograd.Function):
    """The op's autograd in a plain autograd.Function: the same forward and backward kernels
    as the registration above, with a fraction of its per-call Python cost (12 calls a
    MiniLM step). The registration stays for
    opcheck, torch.compile and direct torch.ops calls."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, eps, dropout_p, seed):
        out, xhat, rstd = torch.ops.smarter_fast.dropout_add_layer_norm(
            x, h, weight, bias, eps, dropout_p, seed)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.dropout_p, ctx.seed, ctx.x_dtype, ctx.h_dtype = dropout_p, seed, x.dtype, h.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, rstd, weight = ctx.saved_tensors
        gx, gh, gw, gb = torch.ops.smarter_fast.dropout_add_layer_norm_backward(
            grad_out, xhat, rstd, weight, ctx.dropout_p, ctx.seed, ctx.x_dtype, ctx.h_dtype)
        return gx, gh, gw, gb, None, None, None


def check(x, h, weight, bias, **_):
    """Limits beyond device and dtype: x and h may be bf16, the LayerNorm parameters are fp32
    (autocast keeps them so; a model cast to bf16 as a whole takes the reference)."""
    if weight.dtype != torch.float32 or bias.dtype != torch.float32:
        return [f"weight and bias must be float32, got {str(weight.dtype).replace('torch.', '')} "
                f"and {str(bias.dtype).replace('torch.', '')}"]
    return []


def dropout_add_layer_norm(x, h, weight, bias, eps, dropout_p=0.0):
    seed = draw_seed() if dropout_p > 0.0 else 0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, weight, bias)):
        return _Fn.apply(x, h, weight, bias, float(eps), float(dropout_p), seed)
    return torch.ops.smarter_fast.dropout_add_layer_norm(x, h, weight, bias, float(eps),
                                                         float(dropout_p), seed)[0]


def dropout_mask(n: int, dropout_p: float, seed: int) -> torch.Tensor:
    """The kernels' multipliers (keep / (1 - p') or 0, p' = round(p * 2^16) / 2^16) of flat
    elements 0..n-1 under `seed`: for tests."""
    availability()
    return torch.ops.smarter_fast_testing.dropout_add_layer_norm_mask(int(n), float(dropout_p),
                                                                      int(seed))
