"""The training loop's non-finite check on MiniLM's gradients (22.7M parameters, 85 tensors).

Group `nonfinite-check-minilm`: time to decide whether any loss or gradient holds a NaN or inf
(one host sync), as the Trainer does after every backward:
- `max-norm`: torch._foreach_norm(ord=inf) per tensor (what the check used before);
- `l2-norm`: torch._foreach_norm (L2) per tensor, then the total norm (what it uses now: the
  norm gradient clipping and logging need too).
extra_info: speedup over `max-norm`.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchutil import label, mean_seconds

PROVIDERS = ["max-norm", "l2-norm"]


@pytest.fixture(scope="module")
def grads():
    from smarter_fast.model import MultitaskBert
    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained()
    return [torch.randn_like(p) for p in model.parameters()]


def max_norm_check(grads) -> bool:
    norms = torch._foreach_norm(grads, ord=math.inf)
    return not bool(torch.isfinite(torch.stack(norms)).all())


def l2_norm_check(grads) -> bool:
    from smarter_fast.training.components import NonFiniteGuard

    class P:  # a parameter-like holder of a gradient
        def __init__(self, g):
            self.grad = g

    return NonFiniteGuard().bad([], [P(g) for g in grads])


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_nonfinite_check(benchmark, results, grads, provider):
    fn = max_norm_check if provider == "max-norm" else l2_norm_check
    label(benchmark, "nonfinite-check-minilm", provider, baseline="max-norm",
          parameters=sum(g.numel() for g in grads), tensors=len(grads))
    assert fn(grads) is False
    bad = [g.clone() for g in grads]
    bad[40].view(-1)[7] = float("nan")
    assert fn(bad) is True  # the check can fail
    benchmark.pedantic(fn, args=(grads,), rounds=20, warmup_rounds=2, iterations=1)
    mean = mean_seconds(benchmark)
    if mean:
        results[("nonfinite", provider)] = mean
        base = results.get(("nonfinite", "max-norm"))
        if base:
            benchmark.extra_info["speedup_over_max_norm"] = round(base / mean, 2)
