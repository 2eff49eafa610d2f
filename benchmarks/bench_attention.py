"""Attention over right-padded batches: our backends against torch SDPA and a naive version.

B=32, H=12, L in {32, 64, 128}, D in {32, 64}, random lengths with about 30% padding (each row
keeps between 40% and 100% of L tokens, one row full), key-padding mask (B, L) bool.
Groups `attention-fwd-L{L}-D{D}` and `attention-fwdbwd-L{L}-D{D}` (`-cuda-fp32`/`-cuda-bf16`
on a GPU); providers:
- our backends (`triton`, `cpp`, `ref`) through `smarter_fast.ops.attention(..., backend=name)`;
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with the boolean mask (B, 1, 1, L),
  the baseline of every group;
- `sdpa-nomask`: SDPA over the full padded length without a mask (a lower bound for dense work);
- `naive`: matmul, masked softmax, matmul.
Forward+backward takes the gradients of q, k, v for a fixed upstream gradient with
torch.autograd.grad (no accumulation into .grad).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchutil import DEVICES, backend_or_skip, group_name, label, our_backends, synced

B, H = 32, 12
SHAPES = [(L, D) for L in (32, 64, 128) for D in (32, 64)]
PEERS = ["sdpa", "sdpa-nomask", "naive"]
PROVIDERS = our_backends("attention") + PEERS
CONFIGS = [("cpu", torch.float32)] + [(d, dt) for d in DEVICES if d != "cpu"
                                      for dt in (torch.float32, torch.bfloat16)]


def make_inputs(L, D, device, dtype, requires_grad):
    g = torch.Generator().manual_seed(1000 * L + D)
    shape = (B, H, L, D)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_(requires_grad)
               for _ in range(3))
    lengths = torch.randint(int(round(0.4 * L)), L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None]).to(device)  # (B, L) bool, right padded
    return q, k, v, mask


def naive(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, L, L)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def forward_fn(provider, q, k, v, mask):
    """A function of (q, k, v, mask) for the provider (skips ours when it cannot run)."""
    if provider == "sdpa":
        return lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
    if provider == "sdpa-nomask":
        return lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v)
    if provider == "naive":
        return naive
    backend_or_skip("attention", provider, (q, k, v))
    from smarter_fast.ops import attention

    return lambda q, k, v, m: attention(q, k, v, m, backend=provider)


def _params():
    for device, dtype in CONFIGS:
        for L, D in SHAPES:
            for provider in PROVIDERS:
                marks = [pytest.mark.cuda] if device != "cpu" else []
                dt = str(dtype).replace("torch.", "")
                yield pytest.param(device, dtype, L, D, provider, marks=marks,
                                   id=f"{device}-{dt}-L{L}-D{D}-{provider}")


def _group(mode, L, D, device, dtype):
    suffix = "" if device == "cpu" else str(dtype).replace("torch.", "").replace("float", "fp")
    return group_name(f"attention-{mode}-L{L}-D{D}", device, suffix)


@pytest.mark.parametrize("device,dtype,L,D,provider", list(_params()))
def bench_attention_fwd(benchmark, device, dtype, L, D, provider):
    q, k, v, mask = make_inputs(L, D, device, dtype, requires_grad=False)
    fn = forward_fn(provider, q, k, v, mask)
    padding = 1.0 - mask.float().mean().item()
    label(benchmark, _group("fwd", L, D, device, dtype), provider, baseline="sdpa",
          B=B, H=H, L=L, D=D, padding=round(padding, 3))

    def run():
        with torch.no_grad():
            return fn(q, k, v, mask)

    benchmark(synced(run, device))


@pytest.mark.parametrize("device,dtype,L,D,provider", list(_params()))
def bench_attention_fwdbwd(benchmark, device, dtype, L, D, provider):
    q, k, v, mask = make_inputs(L, D, device, dtype, requires_grad=True)
    fn = forward_fn(provider, q, k, v, mask)
    grad_out = torch.randn_like(q)
    padding = 1.0 - mask.float().mean().item()
    label(benchmark, _group("fwdbwd", L, D, device, dtype), provider, baseline="sdpa",
          B=B, H=H, L=L, D=D, padding=round(padding, 3))

    def run():
        out = fn(q, k, v, mask)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    benchmark(synced(run, device))
