"""SMART: the noise and mean-squared kernels, and a training step with simple SMART.

- `smart-noise`: `smarter_fast.ops.smart_noise(x, sigma, seed, backend=...)` for each of our
  backends against the plain torch expression `x + sigma * torch.randn_like(x)` (`torch`, the
  baseline), on an embedding output x of shape (32, 64, 384) (batch 32, length 64, MiniLM width).
- `smart-mse`: forward and backward of `smarter_fast.ops.smart_mse(a, b)` against
  `((a - b) ** 2).mean()` (`torch`) on two (32, 64, 384) tensors, gradients to both.
- `smart-step`: one SST training step of MultitaskBert (embedded MiniLM, batch 8, the same
  length-bucketed SST batches as train-step, smarter_fast.optim.AdamW, automatic backend):
  `plain` (the baseline: forward, loss, backward, step) against `smart-simple`
  (`smarter_fast.regularizers.smart.smart_simple_loss`: the embeddings once, clean and perturbed passes,
  loss + 10 * smart_mse, sigma 0.05, as `--smart simple` trains) and `smart-simple-ref` (the
  same with the `ref` noise and mean-squared ops), and `smart-full` (`smart_full_loss` with its
  defaults, as `--smart full` trains: one adversarial ascent step, whose backward asks for the
  perturbation's gradient only). extra_info: examples/s and the step-time ratio to `plain`.
"""

from __future__ import annotations

import pytest
import torch

from benchutil import (DEVICES, Cycle, backend_or_skip, group_name, label, make_batches,
                       mean_seconds, our_backends, our_model_and_optimizer, our_step_fn,
                       padding_share, synced)

SHAPE = (32, 64, 384)
SIGMA = 0.05


def _params(op_name):
    for device in DEVICES:
        for provider in our_backends(op_name) + ["torch"]:
            marks = [pytest.mark.cuda] if device != "cpu" else []
            yield pytest.param(device, provider, marks=marks, id=f"{device}-{provider}")


@pytest.mark.parametrize("device,provider", list(_params("smart_noise")))
def bench_smart_noise(benchmark, device, provider):
    x = torch.randn(SHAPE, device=device)
    label(benchmark, group_name("smart-noise", device), provider, baseline="torch",
          shape="x".join(map(str, SHAPE)))
    if provider == "torch":
        def fn():
            return x + SIGMA * torch.randn_like(x)
    else:
        backend_or_skip("smart_noise", provider, (x,))
        from smarter_fast.ops import smart_noise

        def fn():
            return smart_noise(x, SIGMA, 1234, backend=provider)
    benchmark(synced(fn, device))


@pytest.mark.parametrize("device,provider", list(_params("smart_mse")))
def bench_smart_mse(benchmark, device, provider):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(SHAPE, generator=g).to(device).requires_grad_() for _ in range(2))
    label(benchmark, group_name("smart-mse", device), provider, baseline="torch",
          shape="x".join(map(str, SHAPE)), mode="fwd+bwd")
    if provider == "torch":
        def mse(a, b):
            return ((a - b) ** 2).mean()
    else:
        backend_or_skip("smart_mse", provider, (a, b))
        from smarter_fast.ops import smart_mse

        def mse(a, b):
            return smart_mse(a, b, backend=provider)

    def fn():
        return torch.autograd.grad(mse(a, b), (a, b))

    benchmark(synced(fn, device))


N_BATCHES = 12
STEP_PROVIDERS = {"plain": None,
                  "smart-simple": {"sigma": SIGMA, "lambda": 10.0, "backend": "auto"},
                  "smart-simple-ref": {"sigma": SIGMA, "lambda": 10.0, "backend": "ref"},
                  "smart-full": {"mode": "full"}}


def _step_params():
    for device in DEVICES:
        for provider in STEP_PROVIDERS:  # plain first: the others' ratios need it
            marks = [pytest.mark.cuda] if device != "cpu" else []
            yield pytest.param(device, provider, marks=marks, id=f"{device}-{provider}")


@pytest.mark.parametrize("device,provider", list(_step_params()))
def bench_smart_step(benchmark, results, sst_examples, device, provider):
    ids, labels, data_dir, real = sst_examples
    batches = make_batches(ids, labels, N_BATCHES, bucketed=True)
    group = group_name("smart-step", device)
    label(benchmark, group, provider, baseline="plain", batch_size=8, data="cs224n" if real
          else "generated stand-in", padding=round(padding_share(batches), 3))
    model, opt = our_model_and_optimizer("auto", device)
    step = our_step_fn(model, opt, device, smart=STEP_PROVIDERS[provider])
    # Two warm-up steps; then each of the N_BATCHES batches exactly once.
    benchmark.pedantic(step, setup=Cycle(batches, device), rounds=N_BATCHES, warmup_rounds=2,
                       iterations=1)
    mean = mean_seconds(benchmark)
    if mean:
        results[(group, provider)] = mean
        benchmark.extra_info["examples_per_s"] = round(8 / mean, 2)
        plain = results.get((group, "plain"))
        if plain:
            benchmark.extra_info["step_time_vs_plain"] = round(mean / plain, 3)
