"""The casts bf16 training pays around each Linear, CPU (the issue-5 bf16 path).

Group `bf16-bias-grad`: the bias gradient of a bf16 Linear at (400 tokens, 1536 outputs) into
an fp32 buffer: `sum-bf16` sums in bf16 and casts the 1536 sums once (smarter_fast.model.grad_sinks
.bias_grad, as autocast's F.linear does); `sum-dtype-f32` is `torch.sum(g, 0, dtype=float32)`,
which first casts the whole gradient.

Group `bf16-weight-copy`: one AdamW step on the MiniLM parameter set (22.7M) that also leaves a
bf16 copy of the 10.6M encoder Linear weights for the next forward: `fused` writes the copy in
the step's own pass (`adamw_step_(..., copy=)`), `separate` steps and then casts
(`copy.copy_(weights)`, what the Linear layers did after every step), `step-only` is the step
without any copy (the floor). Stepped in turn, the order flipping every round.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchutil import backend_or_skip, label, rotation

TOKENS, OUT = 400, 1536
N_PARAMS = 22_713_216
COPY_LO = 11_918_592  # after the embeddings (word, position, type, LayerNorm) of MiniLM
COPY_N = 10_616_832  # its 6 x 4 encoder Linear weights, 6 x (4 x 384^2 + 2 x 384 x 1536)


@pytest.mark.parametrize("provider", ["sum-dtype-f32", "sum-bf16"])
def bench_bias_grad(benchmark, provider):
    from smarter_fast.model.grad_sinks import bias_grad

    g = torch.randn(TOKENS, OUT).bfloat16()
    out = torch.empty(OUT)
    if provider == "sum-bf16":
        fn = lambda: bias_grad(g, torch.float32, out=out)  # noqa: E731
    else:
        fn = lambda: torch.sum(g, 0, dtype=torch.float32, out=out)  # noqa: E731
    label(benchmark, "bf16-bias-grad", provider, baseline="sum-dtype-f32", shape=f"{TOKENS}x{OUT}")
    benchmark.pedantic(fn, rounds=200, warmup_rounds=10, iterations=1)


def bench_weight_copy_interleaved(benchmark):
    from smarter_fast.ops import adamw_step_

    p, g = torch.randn(N_PARAMS), torch.randn(N_PARAMS) * 1e-3
    m, v = torch.zeros(N_PARAMS), torch.rand(N_PARAMS) * 1e-6
    backend_or_skip("adamw", "cpp", (p, g, m, v))
    copy = torch.empty(COPY_N, dtype=torch.bfloat16)
    weights = p[COPY_LO:COPY_LO + COPY_N]
    step = {"t": 0}

    def adamw(**extra):
        step["t"] += 1
        adamw_step_(p, g, m, v, lr=1e-5, step=step["t"], backend="cpp", **extra)

    providers = {
        "fused": lambda: adamw(copy=copy, copy_offset=COPY_LO),
        "separate": lambda: (adamw(), copy.copy_(weights)),
        "step-only": lambda: adamw(),
    }
    names = list(providers)
    seconds = {n: 0.0 for n in names}
    turn = {"i": 0}

    def round_of_steps():
        order = rotation(names, turn["i"])
        turn["i"] += 1
        for n in order:
            t0 = time.perf_counter()
            providers[n]()
            seconds[n] += time.perf_counter() - t0

    for _ in range(2):
        round_of_steps()
    for n in names:
        seconds[n] = 0.0
    rounds = 30
    label(benchmark, "bf16-weight-copy", "all", params=N_PARAMS, copy_elements=COPY_N)
    benchmark.pedantic(round_of_steps, rounds=rounds, iterations=1)
    ms = {n: 1000 * seconds[n] / rounds for n in names}
    benchmark.extra_info.update({f"{n}_ms": round(ms[n], 2) for n in names})
    benchmark.extra_info["separate_over_fused"] = round(ms["separate"] / ms["fused"], 3)
    benchmark.extra_info["fused_copy_cost_ms"] = round(ms["fused"] - ms["step-only"], 2)
    benchmark.extra_info["separate_copy_cost_ms"] = round(ms["separate"] - ms["step-only"], 2)

