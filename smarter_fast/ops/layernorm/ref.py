"""Reference dropout + residual add + LayerNorm in plain PyTorch (any device, any float dtype).

out = layer_norm(x + dropout(h)). The mask comes from torch's own dropout (torch's generator),
so it differs from the cpp kernels' Philox mask, with the same distribution; `mult`, when given,
is an explicit multiplier tensor (keep / (1 - p) or 0) shaped like h, for tests against the
kernels' mask (smarter_fast.ops.layernorm.cpp.dropout_mask).
"""

import torch
import torch.nn.functional as F


def dropout_add_layer_norm(x, h, weight, bias, eps, dropout_p=0.0, mult=None):
    if mult is not None:
        h = h * mult.to(h.dtype)
    elif dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=True)
    s = x + h
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def dropout_multipliers(n: int, dropout_p: float, seed: int) -> torch.Tensor:
    """The cpp kernels' multipliers (keep / (1 - p') or 0, float32) of flat elements 0..n-1, in
    PyTorch, for tests. Element e takes the 16-bit half (e // 64) % 2 of word (e // 16) % 4 of
    Philox4x32-10(key = seed, counter = 16 (e // 128) + e % 16) and is kept when that half is
    >= round(p * 65536); p' = that threshold / 65536."""
    from ..attention.ref import _philox4x32_10

    threshold = round(dropout_p * 65536)
    if threshold == 0:
        return torch.ones(n)
    e = torch.arange(n, dtype=torch.int64)
    ctr = 16 * (e // 128) + e % 16
    words = _philox4x32_10(ctr & 0xFFFFFFFF, ctr >> 32, torch.zeros_like(e), torch.zeros_like(e),
                           seed)
    word = torch.stack(words).gather(0, ((e // 16) % 4)[None])[0]
    bits = (word >> (16 * ((e // 64) % 2))) & 0xFFFF
    scale = 1.0 / (1.0 - threshold / 65536)
    return torch.where(bits >= threshold, torch.tensor(scale, dtype=torch.float32),
                       torch.tensor(0.0))
