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
