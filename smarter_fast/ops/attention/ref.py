"""Pure-PyTorch attention with a key-padding mask: the oracle for the other backends.

Contract (DESIGN.md §3): keys that are padding get no weight; rows of padded queries are zero
in the output and pass no gradient, so every backend is free to skip them.
"""

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, attention_mask=None, dropout_p=0.0):
    """q, k, v: (B, heads, L, D); attention_mask: (B, L), nonzero for real tokens."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, L, L)
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        # A finite fill keeps fully padded rows finite; they are zeroed below.
        scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v)  # (B, h, L, D)
    if attention_mask is not None:
        out = out * real[:, None, :, None].to(out.dtype)
    return out


def pack_index(cu_seqlens: torch.Tensor, max_seqlen: int):
    """(batch, position) of every packed token, for moving between packed and padded forms."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    batch = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    position = torch.arange(batch.numel(), device=lengths.device) - cu_seqlens[:-1].to(torch.long)[batch]
    return batch, position, lengths


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """q, k, v: (T, heads, D) packed tokens; cu_seqlens: (B + 1,) offsets; returns (T, heads, D)."""
    batch, position, lengths = pack_index(cu_seqlens, max_seqlen)
    n_seq, heads, dim = lengths.numel(), q.shape[1], q.shape[2]

    def pad(x):  # (T, h, D) -> (B, h, L, D)
        out = x.new_zeros(n_seq, max_seqlen, heads, dim)
        out[batch, position] = x
        return out.transpose(1, 2)

    mask = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    out = attention(pad(q), pad(k), pad(v), mask, dropout_p)
    return out.transpose(1, 2)[batch, position]
