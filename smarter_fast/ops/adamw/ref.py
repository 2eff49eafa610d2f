"""Pure-PyTorch AdamW step with the CS224N minBERT semantics (the oracle and fallback)."""

import math

import torch


def step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """Kingma & Ba's "efficient" bias correction folded into the step size."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


@torch.no_grad()
def adamw_step_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step,
                correct_bias=True, copy=None, copy_offset=0):
    """In place: m, v updated; p -= step_size * m / (sqrt(v) + eps); then p -= lr * wd * p;
    then copy = p[copy_offset:].to(copy.dtype) (if given)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size(lr, beta1, beta2, step, correct_bias))
    if weight_decay != 0.0:
        param.add_(param, alpha=-lr * weight_decay)
    cast_into_copy(param, copy, copy_offset)


@torch.no_grad()
def cast_into_copy(param, copy, copy_offset) -> None:
    """copy = param.flatten()[copy_offset:].to(copy.dtype), if a copy is given: the copy of
    adamw_step_ as a pass of its own (the backends whose kernel does not write it)."""
    if copy is not None:
        copy.copy_(param.detach().reshape(-1)[copy_offset:copy_offset + copy.numel()])
