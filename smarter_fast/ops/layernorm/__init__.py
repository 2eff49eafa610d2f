"""Fused dropout + residual add + LayerNorm: the post-LN BERT sublayer tail
`layer_norm(x + dropout(h))` in one pass forward and one backward."""

import torch

from ..registry import Backend, FLOAT_DTYPES, any_device, cpu_only, op
from . import cpp, ref

DROPOUT_ADD_LAYER_NORM = op("dropout_add_layer_norm")
DROPOUT_ADD_LAYER_NORM.register(Backend("cpp", cpp.dropout_add_layer_norm, cpu_only,
                                        (torch.float32, torch.bfloat16), cpp.availability,
                                        cpp.check))
DROPOUT_ADD_LAYER_NORM.register(Backend("ref", ref.dropout_add_layer_norm, any_device,
                                        FLOAT_DTYPES, lambda: None))


def dropout_add_layer_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, eps: float, dropout_p: float = 0.0,
                           backend: str = "auto") -> torch.Tensor:
    """layer_norm(x + dropout(h, dropout_p)) over the last dimension, with LayerNorm `weight`
    and `bias` of shape (H,). x and h have the same shape (..., H). dropout_p is applied as
    given (pass 0 in eval mode). The result has the promoted dtype of x and h."""
    if x.shape != h.shape:
        raise ValueError(f"dropout_add_layer_norm: x {tuple(x.shape)} and h {tuple(h.shape)} "
                         f"must have the same shape")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_add_layer_norm: dropout_p must be in [0, 1), got {dropout_p}")
    impl = DROPOUT_ADD_LAYER_NORM.select(backend, (x, h, weight, bias))
    return impl.fn(x, h, weight, bias, eps, dropout_p)


__all__ = ["dropout_add_layer_norm"]
