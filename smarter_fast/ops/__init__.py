"""Hot ops, each with ref / cpp / triton backends chosen by smarter_fast.ops.registry."""

from .adamw import adamw_step_
from .attention import attention, attention_varlen
from .layernorm import dropout_add_layer_norm
from .registry import OPS, BackendUnavailableError
from .smart import smart_mse, smart_noise

__all__ = ["attention", "attention_varlen", "adamw_step_", "smart_noise", "smart_mse",
           "dropout_add_layer_norm",
           "BackendUnavailableError", "OPS"]
