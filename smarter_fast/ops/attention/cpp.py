"""C++ variable-length attention (csrc/kernels/attention_impl.h): fake and autograd registrations.

Both entry points run one (sequence, head) at a time over its real tokens only: padded queries
and keys are skipped (padded query rows come out zero with zero gradient, as the contract says),
the scale, Q K^T, a stable softmax and P V are fused, and only the log-sum-exp per query (fp32)
is kept for the backward, which recomputes P.

- padded: `attention_fwd(q, k, v, attention_mask)` with q, k, v (B, H, L, D) in any strides
  whose last dimension is contiguous (the model's fused-qkv view needs no copy). The mask may be
  any (B, L) pattern, not only right padding: the kernel gathers the real tokens of each row
  through an index built from the mask, so no prefix check (and no fallback) is needed.
  The output is (B, H, L, D) laid out as (B, L, H, D) in memory, so `out.transpose(1, 2)
  .reshape(B, L, H * D)` is free.
- packed: `attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen)` with (T, H, D) tokens.

fp32 and bf16 inputs (bf16 accumulates in fp32; lse is always fp32); dropout is not supported
(the backend's check reports it, so automatic dispatch falls back to ref). No float64 kernel.

Measured (2-core AVX-512 EPYC, one thread, CPU time, forward+backward, ~30% padding, B=32,
H=12): 1.6-1.8x torch's scaled_dot_product_attention with a boolean mask at L=32/64/128,
D=32 and L=64, D=64.
"""

import torch

from ..registry import cpp_availability

_registered = False


def _padded_like(q):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).permute(0, 2, 1, 3)


def register() -> None:
    """Adds the Python-side registrations once the extension has defined the ops."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("smarter_fast::attention_fwd")
    def _(q, k, v, attention_mask):
        B, H, L, _ = q.shape
        return _padded_like(q), q.new_empty((B, H, L), dtype=torch.float32)

    @torch.library.register_fake("smarter_fast::attention_bwd")
    def _(grad_out, q, k, v, attention_mask, out, lse):
        return _padded_like(q), _padded_like(q), _padded_like(q)

    @torch.library.register_fake("smarter_fast::attention_varlen_fwd")
    def _(q, k, v, cu_seqlens, max_seqlen):
        T, H, _ = q.shape
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            q.new_empty((T, H), dtype=torch.float32)

    @torch.library.register_fake("smarter_fast::attention_varlen_bwd")
    def _(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse):
        return tuple(torch.empty_like(q, memory_format=torch.contiguous_format)
                     for _ in range(3))

    def padded_setup(ctx, inputs, output):
        q, k, v, attention_mask = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, attention_mask, out, lse)

    def padded_backward(ctx, grad_out, grad_lse):
        q, k, v, attention_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.smarter_fast.attention_bwd(grad_out, q, k, v, attention_mask,
                                                          out, lse)
        return dq, dk, dv, None

    torch.library.register_autograd("smarter_fast::attention_fwd", padded_backward,
                                    setup_context=padded_setup)

    def varlen_setup(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.max_seqlen = max_seqlen
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)

    def varlen_backward(ctx, grad_out, grad_lse):
        q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.smarter_fast.attention_varlen_bwd(
            grad_out, q, k, v, cu_seqlens, ctx.max_seqlen, out, lse)
        return dq, dk, dv, None, None

    torch.library.register_autograd("smarter_fast::attention_varlen_fwd", varlen_backward,
                                    setup_context=varlen_setup)


def _available(name):
    inner = cpp_availability(name)

    def availability():
        why = inner()
        if why is None:
            register()
        return why

    return availability


availability = _available("attention_fwd")
varlen_availability = _available("attention_varlen_fwd")


def check(q, k, v, dropout_p=0.0, **_):
    """Limits beyond device and dtype: the C++ kernel has no attention dropout."""
    return ["attention dropout not supported"] if dropout_p > 0.0 else []


def attention(q, k, v, attention_mask=None, dropout_p=0.0):
    if dropout_p > 0.0:
        raise ValueError("attention dropout not supported by the cpp backend")
    return torch.ops.smarter_fast.attention_fwd(q, k, v, attention_mask)[0]


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    if dropout_p > 0.0:
        raise ValueError("attention dropout not supported by the cpp backend")
    return torch.ops.smarter_fast.attention_varlen_fwd(q, k, v, cu_seqlens, int(max_seqlen))[0]
