"""Pure-PyTorch attention with a key-padding mask: the oracle for the other backends.

Contract (docs/design.md, "Ops and their contracts"): keys that are padding get no weight; rows of padded queries are zero
in the output and pass no gradient, so every backend is free to skip them.

Dropout here is F.dropout (torch's own mask). The cpp and triton kernels draw theirs from
Philox4x32-10 keyed by (seed, sequence, head, query, key) instead, never storing it;
`dropout_keep_mask` computes that same stream in PyTorch, and `attention(..., dropout_mult=M)`
applies a given mask, so tests can rebuild the kernels' exact computation.
"""

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, attention_mask=None, dropout_p=0.0, *, dropout_mult=None):
    """q, k, v: (B, heads, L, D); attention_mask: (B, L), nonzero for real tokens.
    dropout_mult (B or 1, heads or 1, L, L), optional: multiplies the probabilities instead of
    F.dropout (keep / (1 - p) or 0, as from `dropout_keep_mask`), for a chosen mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, L, L)
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        # A finite fill keeps fully padded rows finite; they are zeroed below.
        scores = scores.masked_fill(~real[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_mult is not None:
        probs = probs * dropout_mult.to(probs.dtype)
    elif dropout_p > 0.0:
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


# ---- the kernels' dropout stream, in PyTorch (for tests) -----------------------------------

def draw_dropout_seed() -> int:
    """A 62-bit seed for the kernels' dropout, from torch's default generator: reproducible
    under torch.manual_seed. Drawn only when dropout_p > 0."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


_MASK32 = 0xFFFFFFFF


def _philox4x32_10(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on int64 tensors holding uint32 words (products wrap mod 2^64, which keeps
    the low 64 bits exact). Key: (seed & 0xffffffff, seed >> 32)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        p0 = c0 * 0xD2511F53
        p1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = (((p1 >> 32) & _MASK32) ^ c1 ^ k0, p1 & _MASK32,
                          ((p0 >> 32) & _MASK32) ^ c3 ^ k1, p0 & _MASK32)
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """Keys are kept when the top 24 bits of their Philox word are >= this."""
    return int(min(2**24, round(dropout_p * 2**24)))


def dropout_keep_mask(seed: int, n_seq: int, heads: int, length: int, dropout_p: float,
                      device=None) -> torch.Tensor:
    """The cpp / triton kernels' keep mask, bool (n_seq, heads, length, length): [b, h, i, j]
    for query i and key j (ranks among the real tokens of sequence b) is word (j // 16) % 4 of
    Philox4x32-10(key=seed, counter=(16 * (j // 64) + j % 16, i, h, b)), kept when its top 24
    bits are >= round(p * 2^24). (16 consecutive keys share a word: one vector in the kernels.)"""
    b = torch.arange(n_seq, dtype=torch.int64, device=device)[:, None, None, None]
    h = torch.arange(heads, dtype=torch.int64, device=device)[None, :, None, None]
    i = torch.arange(length, dtype=torch.int64, device=device)[None, None, :, None]
    j = torch.arange(length, dtype=torch.int64, device=device)[None, None, None, :]
    shape = (n_seq, heads, length, length)
    words = _philox4x32_10((16 * (j // 64) + j % 16).expand(shape), i.expand(shape),
                           h.expand(shape), b.expand(shape), int(seed))
    w = ((j // 16) % 4).expand(shape)
    r = torch.where(w == 0, words[0], torch.where(w == 1, words[1],
                                                  torch.where(w == 2, words[2], words[3])))
    return (r >> 8) >= dropout_threshold(dropout_p)


def dropout_multipliers(seed, n_seq, heads, length, dropout_p, device=None, dtype=torch.float32):
    """keep / (1 - p), or 0: what the kernels multiply the probabilities by."""
    keep = dropout_keep_mask(seed, n_seq, heads, length, dropout_p, device)
    scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    return keep.to(dtype) * scale
