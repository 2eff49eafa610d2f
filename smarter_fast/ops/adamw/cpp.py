"""C++ AdamW: one parallel, vectorised pass over flat fp32 buffers (28 bytes per parameter)."""

import torch

from ..registry import cpp_availability

def register() -> None:
    @torch.library.register_fake("smarter_fast::adamw_step_")
    def _(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
          correct_bias, copy=None, copy_offset=0):
        return None


availability = cpp_availability("adamw_step_", register)


def check(param, grad, exp_avg, exp_avg_sq, **_):
    bad = [n for n, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
           if not t.is_contiguous()]
    return [f"needs contiguous {', '.join(bad)}"] if bad else []


def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                correct_bias=True, copy=None, copy_offset=0):
    """`copy` (bf16) is written in the same pass as the update (csrc/kernels/kernels_impl.h)."""
    torch.ops.smarter_fast.adamw_step_(param, grad, exp_avg, exp_avg_sq, float(lr), float(beta1),
                                       float(beta2), float(eps), float(weight_decay), int(step),
                                       bool(correct_bias), copy, int(copy_offset))
