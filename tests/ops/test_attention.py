"""Attention (padded with attention_mask, packed with cu_seqlens): the ref contract, and the cpp
kernels against ref on fresh random odd shapes, forward and backward.

The cpp kernels compute in fp32 (no float64 kernel, so no gradcheck): they are compared with
ref run in float64 on the same inputs, at atol 1e-5 / rtol 1e-4 (observed errors ~1e-6).
"""

import math

import pytest
import torch

from smarter_fast import ops
from smarter_fast.ops import BackendUnavailableError
from smarter_fast.ops.attention import ref

ATOL, RTOL = 1e-5, 1e-4


def _qkv(B, H, L, D, dtype=torch.float32, fused=True):
    """q, k, v (B, H, L, D) leaves; fused=True gives the model's layout: strided views of one
    (B, L, 3, H, D) tensor (no copy)."""
    if fused:
        qkv = torch.randn(B, L, 3, H, D, dtype=dtype)
        return [x.detach().requires_grad_() for x in qkv.permute(2, 0, 3, 1, 4)]
    return [torch.randn(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3)]


def _right_padded_mask(lengths, L):
    return torch.arange(L)[None, :] < torch.as_tensor(lengths)[:, None]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _ref64(q, k, v, mask, g):
    """ref in float64 on the same inputs: output and gradients."""
    q2, k2, v2 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = ref.attention(q2, k2, v2, mask)
    return out, _grads(out, (q2, k2, v2), g.double())


def _assert_close64(got, want, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# ---- ref: the contract --------------------------------------------------------------------

def test_ref_matches_sdpa_and_zeroes_padded_queries():
    torch.manual_seed(0)
    B, H, L, D = 3, 2, 9, 16
    q, k, v = _qkv(B, H, L, D)
    mask = _right_padded_mask([9, 4, 1], L)
    out = ref.attention(q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])
    real = mask[:, None, :, None]
    torch.testing.assert_close(out * real, want * real, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[~mask[:, None, :, None].expand_as(out)].abs().sum(), torch.tensor(0.0))
    dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
    pad = ~mask
    assert dq.permute(0, 2, 1, 3)[pad].abs().max() == 0, "padded queries pass no gradient"
    assert dk.permute(0, 2, 1, 3)[pad].abs().max() == 0, "padded keys get no weight"
    assert dv.permute(0, 2, 1, 3)[pad].abs().max() == 0


def test_ref_padded_keys_get_no_weight():
    torch.manual_seed(1)
    q, k, v = _qkv(2, 3, 6, 8)
    mask = _right_padded_mask([6, 3], 6)
    out = ref.attention(q, k, v, mask)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, 3:] += 100.0  # changing padded keys and values changes nothing
    v2[1, :, 3:] -= 50.0
    torch.testing.assert_close(ref.attention(q, k2, v2, mask), out.detach())


def test_ref_varlen_matches_per_sequence_attention():
    torch.manual_seed(2)
    lengths, H, D = [5, 1, 3], 2, 8
    T = sum(lengths)
    q, k, v = [torch.randn(T, H, D) for _ in range(3)]
    got = ref.attention_varlen(q, k, v, _cu(lengths), max(lengths))
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        xs = [x[sl].transpose(0, 1) for x in (q, k, v)]  # (H, n, D)
        s = xs[0] @ xs[1].transpose(-1, -2) / math.sqrt(D)
        want = (s.softmax(-1) @ xs[2]).transpose(0, 1)
        torch.testing.assert_close(got[sl], want, atol=1e-6, rtol=1e-5)
        start += n


def test_cpp_supports_dropout_and_auto_picks_a_kernel(skip_unless_cpp):
    skip_unless_cpp("attention")
    skip_unless_cpp("attention_varlen")
    q, k, v = _qkv(2, 2, 5, 8)
    assert ops.OPS["attention"].backends["cpp"].check(q, k, v, dropout_p=0.1) == []
    assert ops.OPS["attention_varlen"].backends["cpp"].check(q, k, v, dropout_p=0.1) == []
    chosen = ops.OPS["attention"].select("auto", (q, k, v), dropout_p=0.1)
    assert chosen.name in ("cpp", "triton")
    ops.attention(q, k, v, dropout_p=0.1, backend="cpp")


# ---- cpp against ref ------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 7, 33, 130])
@pytest.mark.parametrize("D", [8, 32, 40, 64])
def test_cpp_padded_matches_ref(L, D, skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(1000 * L + D)
    B, H = 3, 5
    q, k, v = _qkv(B, H, L, D, fused=(D != 40))  # fused views and plain contiguous tensors
    lengths = [L, max(1, L // 2), torch.randint(1, L + 1, ()).item()]
    mask = _right_padded_mask(lengths, L)
    out = ops.attention(q, k, v, mask, backend="cpp")
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    want, want_grads = _ref64(q, k, v, mask, g)
    _assert_close64(out, want)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g)


def test_cpp_long_sequence(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(3)
    B, H, L, D = 2, 2, 512, 32
    q, k, v = _qkv(B, H, L, D)
    mask = _right_padded_mask([512, 300], L)
    out = ops.attention(q, k, v, mask, backend="cpp")
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    want, want_grads = _ref64(q, k, v, mask, g)
    _assert_close64(out, want)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g)


def test_cpp_all_but_one_token_padding(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(4)
    B, H, L, D = 4, 3, 17, 32
    q, k, v = _qkv(B, H, L, D)
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[2, 0] = 1  # one real token in the whole batch; rows 0, 1, 3 are all padding
    out = ops.attention(q, k, v, mask, backend="cpp")
    g = torch.randn_like(out)
    dq, dk, dv = _grads(out, (q, k, v), g)
    want, want_grads = _ref64(q, k, v, mask, g)
    _assert_close64(out, want)
    for got_g, want_g in zip((dq, dk, dv), want_grads):
        _assert_close64(got_g, want_g)
    # one token attends to itself only: out = v, dv = g, dq = dk = 0
    torch.testing.assert_close(out[2, :, 0], v[2, :, 0].detach())
    torch.testing.assert_close(dv[2, :, 0], g[2, :, 0])
    others = out.detach().clone()
    others[2, :, 0] = 0
    assert others.count_nonzero() == 0


def test_cpp_padded_rows_are_exactly_zero_with_zero_grads(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(5)
    B, H, L, D = 3, 4, 11, 32
    q, k, v = _qkv(B, H, L, D)
    mask = _right_padded_mask([11, 6, 2], L)
    out = ops.attention(q, k, v, mask, backend="cpp")
    pad = ~mask  # (B, L)
    by_token = lambda t: t.permute(0, 2, 1, 3)[pad]  # noqa: E731  (padded tokens, H, D)
    assert torch.equal(by_token(out), torch.zeros_like(by_token(out)))
    dq, dk, dv = _grads(out, (q, k, v), torch.randn_like(out))
    for d in (dq, dk, dv):
        assert torch.equal(by_token(d), torch.zeros_like(by_token(d)))
    # the output layout lets the model reshape to (B, L, H * D) without a copy
    assert out.transpose(1, 2).is_contiguous()


def test_cpp_any_mask_pattern_and_no_mask(skip_unless_cpp):
    """Not only right padding: any (B, L) mask (bool or int) gives ref's result."""
    skip_unless_cpp("attention")
    torch.manual_seed(6)
    B, H, L, D = 3, 2, 13, 16
    q, k, v = _qkv(B, H, L, D)
    mask = torch.rand(B, L) < 0.6
    mask[:, 5] = True
    for m in (mask, mask.to(torch.int32), None):
        out = ops.attention(q, k, v, m, backend="cpp")
        g = torch.randn_like(out)
        grads = _grads(out, (q, k, v), g)
        want, want_grads = _ref64(q, k, v, m, g)
        _assert_close64(out, want)
        for got_g, want_g in zip(grads, want_grads):
            _assert_close64(got_g, want_g)


@pytest.mark.parametrize("lengths,D", [([1, 1, 1], 32), ([7, 1, 33, 2], 40), ([64, 130], 64)])
def test_cpp_varlen_matches_ref_and_padded(lengths, D, skip_unless_cpp):
    skip_unless_cpp("attention_varlen")
    torch.manual_seed(sum(lengths) + D)
    H, T, L = 5, sum(lengths), max(lengths)
    qkv = torch.randn(T, 3, H, D)
    q, k, v = [x.detach().requires_grad_() for x in qkv.unbind(1)]  # the model's packed views
    cu = _cu(lengths)
    out = ops.attention_varlen(q, k, v, cu, L, backend="cpp")
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    q2, k2, v2 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = ref.attention_varlen(q2, k2, v2, cu, L)
    want_grads = _grads(want, (q2, k2, v2), g.double())
    _assert_close64(out, want)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g)
    # packed and padded entry points agree
    batch, position, _ = ref.pack_index(cu, L)

    def pad(x):
        y = x.new_zeros(len(lengths), L, H, D)
        y[batch, position] = x.detach()
        return y.transpose(1, 2).requires_grad_()

    qp, kp, vp = pad(q), pad(k), pad(v)
    mask = _right_padded_mask(lengths, L)
    out_p = ops.attention(qp, kp, vp, mask, backend="cpp")
    gp = g.new_zeros(len(lengths), L, H, D)
    gp[batch, position] = g
    grads_p = _grads(out_p, (qp, kp, vp), gp.transpose(1, 2))
    unpad = lambda x: x.transpose(1, 2)[batch, position]  # noqa: E731
    torch.testing.assert_close(unpad(out_p), out, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(unpad(a), b, atol=1e-6, rtol=1e-5)


def test_cpp_varlen_rejects_bad_cu_seqlens(skip_unless_cpp):
    skip_unless_cpp("attention_varlen")
    q = torch.randn(6, 2, 8)
    with pytest.raises(RuntimeError, match="must end at the token count"):
        ops.attention_varlen(q, q, q, torch.tensor([0, 2, 5]), 3, backend="cpp")
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.attention_varlen(q, q, q, torch.tensor([0, 4, 3, 6]), 4, backend="cpp")


def test_cpp_bf16_close_to_fp32(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(7)
    B, H, L, D = 2, 3, 20, 32
    q, k, v = _qkv(B, H, L, D, dtype=torch.bfloat16)
    mask = _right_padded_mask([20, 9], L)
    out = ops.attention(q, k, v, mask, backend="cpp")
    assert out.dtype == torch.bfloat16
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    want, want_grads = _ref64(q, k, v, mask, g)
    # inputs are exact in both; the error is bf16 rounding of the outputs (~2^-8 relative)
    _assert_close64(out, want, atol=2e-2, rtol=2e-2)
    for got_g, want_g in zip(grads, want_grads):
        assert got_g.dtype == torch.bfloat16
        _assert_close64(got_g, want_g, atol=3e-2, rtol=3e-2)


def test_cpp_is_chosen_automatically_on_cpu(skip_unless_cpp):
    skip_unless_cpp("attention")
    q, k, v = _qkv(2, 2, 5, 8)
    assert ops.OPS["attention"].select("auto", (q, k, v)).name in ("cpp", "triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        ops.attention(q.double(), k.double(), v.double(), backend="cpp")


def test_cpp_opcheck(skip_unless_cpp):
    skip_unless_cpp("attention")
    skip_unless_cpp("attention_varlen")
    torch.manual_seed(8)
    B, H, L, D = 2, 3, 9, 16
    q, k, v = _qkv(B, H, L, D)
    mask = _right_padded_mask([9, 4], L)
    torch.library.opcheck(torch.ops.smarter_fast.attention_fwd.default, (q, k, v, mask))
    torch.library.opcheck(torch.ops.smarter_fast.attention_fwd.default, (q, k, v, None))
    out, lse = torch.ops.smarter_fast.attention_fwd(q, k, v, mask)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.smarter_fast.attention_bwd.default,
                          (g, q.detach(), k.detach(), v.detach(), mask, out.detach(), lse))
    lengths = [4, 1, 6]
    qp, kp, vp = [torch.randn(11, H, D, requires_grad=True) for _ in range(3)]
    cu = _cu(lengths)
    torch.library.opcheck(torch.ops.smarter_fast.attention_varlen_fwd.default,
                          (qp, kp, vp, cu, 6))
    out, lse = torch.ops.smarter_fast.attention_varlen_fwd(qp, kp, vp, cu, 6)
    torch.library.opcheck(torch.ops.smarter_fast.attention_varlen_bwd.default,
                          (torch.randn_like(out), qp.detach(), kp.detach(), vp.detach(), cu, 6,
                           out.detach(), lse))


def test_cpp_lse_is_the_log_sum_exp(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(9)
    B, H, L, D = 2, 2, 7, 8
    q, k, v = _qkv(B, H, L, D, fused=False)
    mask = _right_padded_mask([7, 3], L)
    _, lse = torch.ops.smarter_fast.attention_fwd(q, k, v, mask)
    s = (q @ k.transpose(-1, -2)).detach() / math.sqrt(D)
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    want = torch.logsumexp(s, -1) * mask[:, None, :]
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)


def test_cpp_non_contiguous_head_dim_and_grad(skip_unless_cpp):
    """Inputs whose last dimension is strided are copied; any grad_out layout works."""
    skip_unless_cpp("attention")
    torch.manual_seed(10)
    B, H, L, D = 2, 3, 10, 24
    k, v = [torch.randn(B, H, L, D, requires_grad=True) for _ in range(2)]
    q_strided = torch.randn(B, H, L, D, 2)[..., 1].requires_grad_()  # stride 2 along D
    mask = _right_padded_mask([10, 6], L)
    out = ops.attention(q_strided, k, v, mask, backend="cpp")
    g = torch.randn(B, L, H, D).transpose(1, 2)  # a non-contiguous gradient
    grads = _grads(out, (q_strided, k, v), g)
    want, want_grads = _ref64(q_strided, k, v, mask, g)
    _assert_close64(out, want)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g)


# ---- cpp attention dropout: a Philox mask keyed by (seed, sequence, head, query, key) -----------
# The kernels never store the mask; ref.dropout_multipliers (PyTorch Philox) and
# cpp.dropout_mask (the kernels' own generator) give it, so ref can redo the exact computation.

from smarter_fast.ops.attention import cpp as cpp_attn  # noqa: E402

P_DROP = 0.1


def _ref64_mult(q, k, v, mask, g, mult):
    """ref in float64 with the given dropout multipliers: output and gradients."""
    q2, k2, v2 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = ref.attention(q2, k2, v2, mask, dropout_mult=mult.double())
    return out, _grads(out, (q2, k2, v2), g.double())


@pytest.mark.parametrize("length", [1, 7, 64, 130])
def test_cpp_dropout_mask_is_the_philox_reference(length, skip_unless_cpp):
    """The kernels' generator (whatever vector width) gives the PyTorch Philox stream's mask."""
    skip_unless_cpp("attention")
    for seed, p in ((12345678901234, 0.1), (2**62 - 1, 0.5), (0, 0.9)):
        got = cpp_attn.dropout_mask(3, 2, length, p, seed)
        want = ref.dropout_multipliers(seed, 3, 2, length, p)
        assert torch.equal(got, want)


def test_cpp_dropout_mask_same_in_every_cpu_variant(skip_unless_cpp):
    """DEFAULT (scalar) and AVX2 generators, which this CPU would not pick, give the same mask."""
    skip_unless_cpp("attention")
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = ("import torch\n"
              "from smarter_fast import ops\n"
              "from smarter_fast.ops.attention import cpp, ref\n"
              "ops.attention(*[torch.randn(1, 1, 2, 8)] * 3, backend='cpp')\n"
              "print(torch.ops.smarter_fast.kernel_variant())\n"
              "for L, seed, p in ((37, 12345678901234, 0.1), (130, 2**62 - 1, 0.5)):\n"
              "    assert torch.equal(cpp.dropout_mask(2, 3, L, p, seed),\n"
              "                       ref.dropout_multipliers(seed, 2, 3, L, p)), L\n")
    root = Path(__file__).resolve().parents[2]
    for cap in ("default", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap,
                   PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_cpp_dropout_zero_is_unchanged(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(20)
    q, k, v = _qkv(2, 3, 11, 16)
    mask = _right_padded_mask([11, 5], 11)
    plain, lse = torch.ops.smarter_fast.attention_fwd(q, k, v, mask)
    zero, lse0 = torch.ops.smarter_fast.attention_fwd(q, k, v, mask, 0.0, 1234)
    assert torch.equal(plain, zero) and torch.equal(lse, lse0)
    state = torch.get_rng_state()
    out = ops.attention(q, k, v, mask, dropout_p=0.0, backend="cpp")
    assert torch.equal(torch.get_rng_state(), state), "no seed is drawn without dropout"
    assert torch.equal(out, plain)


def test_cpp_dropout_same_seed_same_output(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(21)
    q, k, v = _qkv(2, 3, 19, 16)
    mask = _right_padded_mask([19, 8], 19)
    torch.manual_seed(5)
    a = ops.attention(q, k, v, mask, dropout_p=P_DROP, backend="cpp")
    b = ops.attention(q, k, v, mask, dropout_p=P_DROP, backend="cpp")
    torch.manual_seed(5)
    c = ops.attention(q, k, v, mask, dropout_p=P_DROP, backend="cpp")
    assert torch.equal(a, c), "torch.manual_seed makes the mask reproducible"
    assert not torch.equal(a, b), "successive calls draw new masks"
    torch.manual_seed(5)
    seed = ref.draw_dropout_seed()
    d, _ = torch.ops.smarter_fast.attention_fwd(q, k, v, mask, P_DROP, seed)
    assert torch.equal(a, d)


def test_cpp_dropout_drops_p_of_the_real_weights(skip_unless_cpp):
    """With q = k = 0 and V = I the output is P' itself (P uniform over the real keys): the
    fraction of zeros among real (query, key) pairs is p, kept weights are 1 / (n (1 - p)),
    padded keys and padded queries stay zero."""
    skip_unless_cpp("attention")
    B, H, L = 4, 6, 96
    lengths = [96, 70, 33, 1]
    q = torch.zeros(B, H, L, L)
    v = torch.eye(L).expand(B, H, L, L).contiguous()
    mask = _right_padded_mask(lengths, L)
    for p in (0.1, 0.5):
        torch.manual_seed(22)
        out = ops.attention(q, q, v, mask, dropout_p=p, backend="cpp")
        real = mask[:, None, :, None] & mask[:, None, None, :]
        assert out[~real.expand_as(out)].abs().max() == 0
        n = torch.tensor(lengths, dtype=torch.float32)[:, None, None, None].expand_as(out)
        vals = (out * n * (1 - p))[real.expand_as(out)]
        kept = vals != 0
        torch.testing.assert_close(vals[kept], torch.ones_like(vals[kept]))
        frac = 1.0 - kept.float().mean().item()
        count = kept.numel()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / count), (frac, p, count)


def test_cpp_dropout_is_unbiased(skip_unless_cpp):
    """E[out] over seeds is the output without dropout (inverted dropout); within 5 standard
    errors of the mean, element by element."""
    skip_unless_cpp("attention")
    torch.manual_seed(23)
    q, k, v = _qkv(2, 2, 13, 8, fused=False)
    mask = _right_padded_mask([13, 6], 13)
    with torch.no_grad():
        want = ops.attention(q, k, v, mask, backend="cpp")
        samples = torch.stack([ops.attention(q, k, v, mask, dropout_p=0.3, backend="cpp")
                               for _ in range(800)])
    mean, sem = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert ((mean - want).abs() <= 5 * sem + 1e-6).all(), (mean - want).abs().max()


@pytest.mark.parametrize("L,D", [(7, 8), (33, 40), (130, 32)])
def test_cpp_dropout_matches_ref_with_the_same_mask(L, D, skip_unless_cpp):
    """Forward and backward against ref (float64) applying the kernels' own mask."""
    skip_unless_cpp("attention")
    torch.manual_seed(24 + L)
    B, H = 3, 4
    q, k, v = _qkv(B, H, L, D, fused=(D != 40))
    mask = _right_padded_mask([L, max(1, L // 2), 1], L)
    seed = 0x1234_5678_9ABC
    out, _ = torch.ops.smarter_fast.attention_fwd(q, k, v, mask, P_DROP, seed)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    mult = cpp_attn.dropout_mask(B, H, L, P_DROP, seed)
    assert torch.equal(mult, ref.dropout_multipliers(seed, B, H, L, P_DROP))
    want, want_grads = _ref64_mult(q, k, v, mask, g, mult)
    _assert_close64(out, want)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g)
    # padded query rows: zero output, zero gradients; padded keys: zero dK, dV
    pad = ~mask
    assert out.detach().permute(0, 2, 1, 3)[pad].abs().max() == 0
    for gr in grads:
        assert gr.permute(0, 2, 1, 3)[pad].abs().max() == 0
    # through ops.attention (seed drawn from torch's generator, saved for the backward)
    torch.manual_seed(7)
    out2 = ops.attention(q, k, v, mask, dropout_p=P_DROP, backend="cpp")
    grads2 = _grads(out2, (q, k, v), g)
    torch.manual_seed(7)
    mult2 = ref.dropout_multipliers(ref.draw_dropout_seed(), B, H, L, P_DROP)
    want2, want_grads2 = _ref64_mult(q, k, v, mask, g, mult2)
    _assert_close64(out2, want2)
    for got_g, want_g in zip(grads2, want_grads2):
        _assert_close64(got_g, want_g)


def test_cpp_dropout_any_mask_pattern_keys_on_real_token_ranks(skip_unless_cpp):
    """With a mask that is not right padding, the Philox row and column are the ranks of the
    real tokens (so packed, padded and any padding pattern share one mask)."""
    skip_unless_cpp("attention")
    torch.manual_seed(25)
    B, H, L, D = 2, 3, 12, 16
    q, k, v = _qkv(B, H, L, D)
    mask = torch.rand(B, L) < 0.6
    mask[:, 3] = True
    seed = 99
    out, _ = torch.ops.smarter_fast.attention_fwd(q, k, v, mask, 0.25, seed)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    ranked = cpp_attn.dropout_mask(B, H, L, 0.25, seed)
    mult = torch.zeros(B, H, L, L)
    for b in range(B):
        pos = mask[b].nonzero().flatten()
        n = pos.numel()
        mult[b][:, pos[:, None], pos[None, :]] = ranked[b, :, :n, :n]
    want, want_grads = _ref64_mult(q, k, v, mask, g, mult)
    _assert_close64(out, want)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g)


@pytest.mark.parametrize("lengths,D", [([7, 1, 33, 2], 40), ([64, 130], 32)])
def test_cpp_dropout_varlen_matches_padded_and_ref(lengths, D, skip_unless_cpp):
    skip_unless_cpp("attention_varlen")
    torch.manual_seed(26 + D)
    H, T, L = 3, sum(lengths), max(lengths)
    qkv = torch.randn(T, 3, H, D)
    q, k, v = [x.detach().requires_grad_() for x in qkv.unbind(1)]
    cu = _cu(lengths)
    seed = 31337
    out, _ = torch.ops.smarter_fast.attention_varlen_fwd(q, k, v, cu, L, P_DROP, seed)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    batch, position, _ = ref.pack_index(cu, L)

    def pad(x):
        y = x.new_zeros(len(lengths), L, H, D)
        y[batch, position] = x.detach()
        return y.transpose(1, 2).requires_grad_()

    qp, kp, vp = pad(q), pad(k), pad(v)
    mask = _right_padded_mask(lengths, L)
    out_p, _ = torch.ops.smarter_fast.attention_fwd(qp, kp, vp, mask, P_DROP, seed)
    gp = g.new_zeros(len(lengths), L, H, D)
    gp[batch, position] = g
    grads_p = _grads(out_p, (qp, kp, vp), gp.transpose(1, 2))
    unpad = lambda x: x.transpose(1, 2)[batch, position]  # noqa: E731
    torch.testing.assert_close(unpad(out_p), out, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(unpad(a), b, atol=1e-6, rtol=1e-5)
    mult = cpp_attn.dropout_mask(len(lengths), H, L, P_DROP, seed)
    want, want_grads = _ref64_mult(qp, kp, vp, mask, gp.transpose(1, 2), mult)
    _assert_close64(out, unpad(want))
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, unpad(want_g))


def test_cpp_dropout_bf16_and_p_one(skip_unless_cpp):
    skip_unless_cpp("attention")
    torch.manual_seed(27)
    B, H, L, D = 2, 3, 20, 32
    q, k, v = _qkv(B, H, L, D, dtype=torch.bfloat16)
    mask = _right_padded_mask([20, 9], L)
    out, _ = torch.ops.smarter_fast.attention_fwd(q, k, v, mask, P_DROP, 5)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    want, want_grads = _ref64_mult(q, k, v, mask, g, cpp_attn.dropout_mask(B, H, L, P_DROP, 5))
    _assert_close64(out, want, atol=2e-2, rtol=2e-2)
    for got_g, want_g in zip(grads, want_grads):
        _assert_close64(got_g, want_g, atol=3e-2, rtol=3e-2)
    out1 = ops.attention(q.float(), k.float(), v.float(), mask, dropout_p=1.0, backend="cpp")
    assert out1.abs().max() == 0  # everything dropped, as F.dropout(p=1)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        torch.ops.smarter_fast.attention_fwd(q, k, v, mask, 1.5, 5)


def test_cpp_dropout_opcheck(skip_unless_cpp):
    skip_unless_cpp("attention")
    skip_unless_cpp("attention_varlen")
    torch.manual_seed(28)
    B, H, L, D = 2, 3, 9, 16
    q, k, v = _qkv(B, H, L, D)
    mask = _right_padded_mask([9, 4], L)
    torch.library.opcheck(torch.ops.smarter_fast.attention_fwd.default,
                          (q, k, v, mask, P_DROP, 77))
    out, lse = torch.ops.smarter_fast.attention_fwd(q, k, v, mask, P_DROP, 77)
    torch.library.opcheck(torch.ops.smarter_fast.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask,
                           out.detach(), lse, P_DROP, 77))
    qp, kp, vp = [torch.randn(11, H, D, requires_grad=True) for _ in range(3)]
    cu = _cu([4, 1, 6])
    torch.library.opcheck(torch.ops.smarter_fast.attention_varlen_fwd.default,
                          (qp, kp, vp, cu, 6, P_DROP, 78))
    out, lse = torch.ops.smarter_fast.attention_varlen_fwd(qp, kp, vp, cu, 6, P_DROP, 78)
    torch.library.opcheck(torch.ops.smarter_fast.attention_varlen_bwd.default,
                          (torch.randn_like(out), qp.detach(), kp.detach(), vp.detach(), cu, 6,
                           out.detach(), lse, P_DROP, 78))
