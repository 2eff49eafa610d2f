"""Gradient surgery: combining the per-task encoder gradients of one step (`--grad-surgery`).

Group `surgery-combine-{pcgrad,gradvac}` (CPU): T=3 task gradients of the embedded MiniLM's
encoder (22.7M parameters; rows drawn at random, the second and third pulled against the first so
that pairs conflict), already collected in `GradientSurgery.buffer`; one call writes the combined
gradient as the encoder's `.grad`.
- `gram`: `GradientSurgery.combine()`: the algorithm on the rows' float64 Gram matrix (one pass
  over the rows for it), then one weighted sum into a buffer kept from step to step;
- `per-vector` (the baseline): the same combination as the paper writes it and as `combine()`
  did before, on the D-vectors themselves: a float64 copy of the rows for the logged cosines,
  `pcgrad_reference` / `GradVac.reference` (float64 copies of g_i and g_j for every pair's dot
  product and norms), then a fresh copy of the combined gradient per parameter.
extra_info: the parameter count and `ratio_to_per_vector`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchutil import label, mean_seconds

T = 3


@pytest.fixture(scope="module")
def encoder():
    from smarter_fast.model import MultitaskBert

    return MultitaskBert.from_pretrained(backend="auto")


def _fill(surgery):
    g = torch.Generator().manual_seed(0)
    surgery.buffer.normal_(generator=g)
    surgery.buffer[1:] -= 0.5 * surgery.buffer[0]


def _per_vector_combine(surgery):
    """combine() as it was before the Gram-matrix form (kept here as the baseline)."""
    with torch.no_grad():
        G = surgery.buffer[list(range(T))]
        Gd = G.double()
        norms = Gd.norm(dim=1).clamp(min=1e-30)
        surgery.last_cosines = ((Gd @ Gd.T) / norms[:, None] / norms[None, :]).float()
        if surgery.method == "pcgrad":
            from smarter_fast.regularizers.surgery import pcgrad_reference
            combined, _ = pcgrad_reference(G, surgery.rng)
        else:
            combined, _ = surgery.gradvac.reference(G, surgery.rng)
        off = 0
        for p, n in zip(surgery.params, surgery.sizes):
            p.grad = combined[off:off + n].view_as(p).clone()
            off += n


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
@pytest.mark.parametrize("provider", ["per-vector", "gram"])
def bench_surgery_combine(benchmark, results, encoder, method, provider):
    from smarter_fast.regularizers.surgery import GradientSurgery
    from smarter_fast.tasks import TASK_NAMES

    surgery = GradientSurgery(encoder, TASK_NAMES, method, seed=0)
    _fill(surgery)
    group = f"surgery-combine-{method}"
    label(benchmark, group, provider, baseline="per-vector", tasks=T, params=sum(surgery.sizes))
    fn = surgery.combine if provider == "gram" else (lambda: _per_vector_combine(surgery))
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
    encoder.zero_grad(set_to_none=True)
    mean = mean_seconds(benchmark)
    if mean:
        results[(group, provider)] = mean
        base = results.get((group, "per-vector"))
        if base:
            benchmark.extra_info["ratio_to_per_vector"] = round(base / mean, 2)
