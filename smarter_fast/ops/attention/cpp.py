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

fp32 and bf16 inputs (bf16 accumulates in fp32; lse is always fp32). No float64 kernel.

Attention dropout (dropout_p > 0) is inverted dropout on the probabilities, P' = P * keep /
(1 - p), O = P' V, with a mask that is never stored: keep(i, j) for query i and key j (ranks
among the real tokens of the sequence) is a pure function of (seed, sequence, head, i, j) from
Philox4x32-10 (ref.dropout_keep_mask computes the same stream in PyTorch), so the backward
regenerates it. The seed is drawn from torch's default generator (ref.draw_dropout_seed) only when
dropout_p > 0, so torch.manual_seed makes training reproducible; it is saved for the backward.
Padded keys and queries get no dropout (they are skipped); packed and padded inputs get the same
mask for the same seed. Its speed against torch's scaled_dot_product_attention:
benchmarks/bench_attention.py.
"""

import torch

from ..registry import cpp_availability
from .ref import draw_dropout_seed


def _padded_like(q):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).permute(0, 2, 1, 3)


def register() -> None:
    """Adds the Python-side registrations once the extension has defined the ops."""

    @torch.library.register_fake("smarter_fast::attention_fwd")
    def _(q, k, v, attention_mask, dropout_p=0.0, seed=0):
        B, H, L, _ = q.shape
        return _padded_like(q), q.new_empty((B, H, L), dtype=torch.float32)

    @torch.library.register_fake("smarter_fast::attention_bwd")
    def _(grad_out, q, k, v, attention_mask, out, lse, dropout_p=0.0, seed=0):
        return _padded_like(q), _padded_like(q), _padded_like(q)

    @torch.library.register_fake("smarter_fast::attention_varlen_fwd")
    def _(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, seed=0):
        T, H, _ = q.shape
        return torch.empty_like(q, memory_format=torch.contiguous_format), \
            q.new_empty((T, H), dtype=torch.float32)

    @torch.library.register_fake("smarter_fast::attention_varlen_bwd")
    def _(grad_out, q, k, v, cu_seqlens, max_seqlen, out, lse, dropout_p=0.0, seed=0):
        return tuple(torch.empty_like(q, memory_format=torch.contiguous_format)
                     for _ in range(3))

    def padded_setup(ctx, inputs, output):
        q, k, v, attention_mask, dropout_p, seed = _with_defaults(inputs, 4)
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.save_for_backward(q, k, v, attention_mask, out, lse)

    def padded_backward(ctx, grad_out, grad_lse):
        q, k, v, attention_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.smarter_fast.attention_bwd(grad_out, q, k, v, attention_mask,
                                                          out, lse, ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("smarter_fast::attention_fwd", padded_backward,
                                    setup_context=padded_setup)

    def varlen_setup(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, dropout_p, seed = _with_defaults(inputs, 5)
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.max_seqlen, ctx.dropout_p, ctx.seed = max_seqlen, dropout_p, seed
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)

    def varlen_backward(ctx, grad_out, grad_lse):
        q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.smarter_fast.attention_varlen_bwd(
            grad_out, q, k, v, cu_seqlens, ctx.max_seqlen, out, lse, ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd("smarter_fast::attention_varlen_fwd", varlen_backward,
                                    setup_context=varlen_setup)


def _with_defaults(inputs, n_required):
    """The op's inputs with dropout_p and seed filled in when the caller left them out."""
    inputs = tuple(inputs)
    return inputs + (0.0, 0)[len(inputs) - n_required:]



availability = cpp_availability("attention_fwd", register)
varlen_availability = cpp_availability("attention_varlen_fwd", register)


def check(q, k, v, dropout_p=0.0, **_):
    """Limits beyond device and dtype: none (dropout included)."""
    return []


def attention(q, k, v, attention_mask=None, dropout_p=0.0):
    if dropout_p > 0.0:
        return torch.ops.smarter_fast.attention_fwd(q, k, v, attention_mask, float(dropout_p),
                                                    draw_dropout_seed())[0]
    return torch.ops.smarter_fast.attention_fwd(q, k, v, attention_mask)[0]


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    if dropout_p > 0.0:
        return torch.ops.smarter_fast.attention_varlen_fwd(
            q, k, v, cu_seqlens, int(max_seqlen), float(dropout_p), draw_dropout_seed())[0]
    return torch.ops.smarter_fast.attention_varlen_fwd(q, k, v, cu_seqlens, int(max_seqlen))[0]


def dropout_mask(n_seq, heads, length, dropout_p, seed):
    """For tests: the kernels' dropout multipliers (keep / (1 - p), or 0) as (n_seq, heads,
    length, length), [b, h, i, j] for query i and key j of sequence b."""
    return torch.ops.smarter_fast_testing.attention_dropout_mask(
        n_seq, heads, length, float(dropout_p), int(seed))
