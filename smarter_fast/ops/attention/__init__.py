"""Attention over padded batches (with a key-padding mask) or packed variable-length tokens."""

import torch

from ..registry import Backend, FLOAT_DTYPES, any_device, cpu_only, op, triton_devices
from . import cpp, ref, triton

ATTENTION = op("attention")
ATTENTION_VARLEN = op("attention_varlen")
for _op, _ref, _cpp, _cpp_availability in (
        (ATTENTION, ref.attention, cpp.attention, cpp.availability),
        (ATTENTION_VARLEN, ref.attention_varlen, cpp.attention_varlen, cpp.varlen_availability)):
    _op.register(Backend("triton", getattr(triton, _op.name), triton_devices, triton.DTYPES,
                         triton.availability, triton.check))  # triton.attention[_varlen]
    _op.register(Backend("cpp", _cpp, cpu_only, (torch.float32, torch.bfloat16),
                         _cpp_availability, cpp.check))
    _op.register(Backend("ref", _ref, any_device, FLOAT_DTYPES, lambda: None))


def _check_qkv(q, k, v, ndim):
    if not (q.dim() == k.dim() == v.dim() == ndim):
        raise ValueError(f"attention: q, k, v must have {ndim} dimensions, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v shapes differ: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attention_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
              backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention. q, k, v: (B, heads, L, head_dim); attention_mask: (B, L),
    nonzero for real tokens. Padded keys get no weight; padded query rows come out zero and
    pass no gradient. Returns (B, heads, L, head_dim)."""
    _check_qkv(q, k, v, 4)
    if attention_mask is not None and attention_mask.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"attention: attention_mask must be (B, L) = {(q.shape[0], q.shape[2])}, "
                         f"got {tuple(attention_mask.shape)}")
    impl = ATTENTION.select(backend, (q, k, v), dropout_p=dropout_p)
    return impl.fn(q, k, v, attention_mask, dropout_p)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over packed sequences. q, k, v: (T, heads, head_dim), the sequences laid end
    to end; cu_seqlens: (B + 1,) int offsets starting at 0; max_seqlen: the longest length.
    Each token attends only within its own sequence. Returns (T, heads, head_dim)."""
    _check_qkv(q, k, v, 3)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("attention_varlen: cu_seqlens must be 1-D with at least 2 entries")
    impl = ATTENTION_VARLEN.select(backend, (q, k, v), dropout_p=dropout_p)
    return impl.fn(q, k, v, cu_seqlens, max_seqlen, dropout_p)


__all__ = ["attention", "attention_varlen"]
