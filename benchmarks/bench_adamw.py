"""One AdamW step on the parameter sets of MiniLM (all-MiniLM-L6-v2, 22.7M parameters) and
BERT-base (109.5M), built as lists of tensors with the real shapes.

Groups `adamw-minilm`, `adamw-bert-base` (`-cuda` on a GPU); providers:
- our backends (`triton`, `cpp`, `ref`): `smarter_fast.ops.adamw_step_` on four flat fp32
  buffers (param, grad, exp_avg, exp_avg_sq), the optimizer's layout;
- `optim`: `smarter_fast.optim.AdamW(...).step()` on the real parameter list (flat buffers inside;
  gradients stay set between steps, so no gradient copy is timed);
- `torch-forloop`, `torch-foreach`, `torch-fused`: `torch.optim.AdamW(foreach=False)`,
  `(foreach=True)`, `(fused=True)`; `torch-fused` is the baseline of the group;
- `copy`: `dst.copy_(src)` over the same number of fp32 elements, the bandwidth yardstick.
extra_info: `gb_per_s` at 28 bytes per parameter (read p, g, m, v; write p, m, v) or 8 bytes per
element for `copy`, and `copy_share`, that figure over the copy bandwidth measured once in the
same session (`copy_bandwidth` fixture, 128 MiB buffers).

Group `adamw-minilm-interleaved`: ours (`auto`: `adamw_step_` with the automatic backend;
`optim`) and `torch.optim.AdamW(fused=True)` stepped alternately in one loop (the order flipping
every round), so both see the same machine state; extra_info has both median step times, the
step-time ratio ours / torch-fused (target <= 1.05) and its inverse, the speed ratio (>= 0.95).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from benchutil import (DEVICES, backend_or_skip, group_name, label, our_backends, rotation, sync,
                       synced)

LR, WD = 1e-5, 0.01


def bert_param_shapes(vocab=30522, max_pos=512, type_vocab=2, hidden=384, inter=1536, layers=6):
    """Shapes of a Hugging Face BertModel's parameters (separate query/key/value, with pooler)."""
    H, I = hidden, inter
    shapes = [(vocab, H), (max_pos, H), (type_vocab, H), (H,), (H,)]  # embeddings + LayerNorm
    for _ in range(layers):
        shapes += [(H, H), (H,)] * 3          # query, key, value
        shapes += [(H, H), (H,), (H,), (H,)]  # attention output dense + LayerNorm
        shapes += [(I, H), (I,), (H, I), (H,), (H,), (H,)]  # intermediate, output, LayerNorm
    shapes += [(H, H), (H,)]  # pooler
    return shapes


PARAM_SETS = {
    "minilm": bert_param_shapes(),  # 22,713,216 parameters
    "bert-base": bert_param_shapes(hidden=768, inter=3072, layers=12),  # 109,482,240
}
TORCH_PROVIDERS = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
                   "torch-fused": dict(fused=True)}
PROVIDERS = our_backends("adamw") + ["optim"] + list(TORCH_PROVIDERS) + ["copy"]


def numel(shapes) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


def make_params(shapes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device)
        params.append(p)
    return params


def torch_adamw(params, options):
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, eps=1e-6, **options)
    return opt


def our_optimizer(params, backend="auto"):
    try:
        from smarter_fast.optim import AdamW
    except ImportError as e:  # being written in parallel
        pytest.skip(f"smarter_fast.optim.AdamW is not available: {e}")
    return AdamW(params, lr=LR, weight_decay=WD, eps=1e-6, backend=backend)


def _params():
    for device in DEVICES:
        for set_name in PARAM_SETS:
            for provider in PROVIDERS:
                marks = [pytest.mark.cuda] if device != "cpu" else []
                yield pytest.param(device, set_name, provider, marks=marks,
                                   id=f"{device}-{set_name}-{provider}")


@pytest.mark.parametrize("device,set_name,provider", list(_params()))
def bench_adamw(benchmark, copy_bandwidth, device, set_name, provider):
    shapes = PARAM_SETS[set_name]
    n = numel(shapes)
    label(benchmark, group_name(f"adamw-{set_name}", device), provider, baseline="torch-fused",
          params=n)
    if provider == "copy":
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        fn, bytes_moved = (lambda: dst.copy_(src)), 8 * n
    elif provider in TORCH_PROVIDERS:
        params = make_params(shapes, device)
        opt = torch_adamw(params, TORCH_PROVIDERS[provider])
        fn, bytes_moved = opt.step, 28 * n
    elif provider == "optim":
        params = make_params(shapes, device)
        opt = our_optimizer(params)
        fn, bytes_moved = opt.step, 28 * n
    else:
        g = torch.Generator().manual_seed(0)
        flat = [(torch.randn(n, generator=g) * s).to(device) for s in (0.02, 1e-3, 0.0, 0.0)]
        p, grad, m, v = flat
        backend_or_skip("adamw", provider, (p, grad, m, v))
        from smarter_fast.ops import adamw_step_

        state = {"step": 0}

        def fn():
            state["step"] += 1
            adamw_step_(p, grad, m, v, lr=LR, eps=1e-6, weight_decay=WD, step=state["step"],
                        backend=provider)

        bytes_moved = 28 * n

    benchmark(synced(fn, device))
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None:
        gbps = bytes_moved / stats.mean / 1e9
        benchmark.extra_info["gb_per_s"] = round(gbps, 2)
        benchmark.extra_info["copy_gb_per_s"] = round(copy_bandwidth[device], 2)
        benchmark.extra_info["copy_share"] = round(gbps / copy_bandwidth[device], 3)


def _interleaved_params():
    for device in DEVICES:
        for ours in ("auto", "optim"):
            marks = [pytest.mark.cuda] if device != "cpu" else []
            yield pytest.param(device, ours, marks=marks, id=f"{device}-minilm-{ours}")


@pytest.mark.parametrize("device,ours", list(_interleaved_params()))
def bench_adamw_interleaved(benchmark, copy_bandwidth, device, ours):
    shapes = PARAM_SETS["minilm"]
    n = numel(shapes)
    label(benchmark, group_name("adamw-minilm-interleaved", device), ours, params=n,
          peer="torch-fused")
    torch_params = make_params(shapes, device)
    fused = torch_adamw(torch_params, TORCH_PROVIDERS["torch-fused"])
    if ours == "optim":
        our_params = make_params(shapes, device)
        mine = our_optimizer(our_params).step
    else:
        g = torch.Generator().manual_seed(0)
        p, grad, m, v = [(torch.randn(n, generator=g) * s).to(device)
                         for s in (0.02, 1e-3, 0.0, 0.0)]
        from smarter_fast.ops import OPS, adamw_step_

        benchmark.extra_info["backend"] = OPS["adamw"].select("auto", (p, grad, m, v)).name
        state = {"step": 0}

        def mine():
            state["step"] += 1
            adamw_step_(p, grad, m, v, lr=LR, eps=1e-6, weight_decay=WD, step=state["step"])

    times = {"ours": [], "fused": []}
    turn = {"i": 0}

    def timed(key, fn):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times[key].append(time.perf_counter() - t0)

    def pair():
        order = rotation([("ours", mine), ("fused", fused.step)], turn["i"])
        turn["i"] += 1
        for key, fn in order:
            timed(key, fn)

    for _ in range(3):  # warm both up, then forget those times
        pair()
    times["ours"].clear()
    times["fused"].clear()
    benchmark.pedantic(pair, rounds=30, iterations=1)
    ours_t, fused_t = statistics.median(times["ours"]), statistics.median(times["fused"])
    ratio = ours_t / fused_t
    benchmark.extra_info.update(
        ours_ms=round(ours_t * 1e3, 3), torch_fused_ms=round(fused_t * 1e3, 3),
        step_time_ratio=round(ratio, 3), speed_vs_torch_fused=round(1.0 / ratio, 3),
        ours_copy_share=round(28 * n / ours_t / 1e9 / copy_bandwidth[device], 3),
        torch_fused_copy_share=round(28 * n / fused_t / 1e9 / copy_bandwidth[device], 3))
