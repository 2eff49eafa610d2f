"""Triton attention on CPU through Triton's interpreter (TRITON_INTERPRET=1), against ref.

Small odd shapes, forward and backward, padded and packed. The interpreter computes tl.dot
exactly in fp32, so these tests cannot show TF32 or tensor-core rounding. Tolerances:
- fp32: atol = rtol = 2e-5 against ref in fp32 (IEEE dots unless TF32 is enabled in torch);
  tests/cuda applies the rule below to fp32 as well, against a float64 reference, atol 2e-5;
- bf16 / fp16: |triton - ref_fp32| <= 2 * |ref_lowp - ref_fp32| + atol, with atol 2e-2 (bf16)
  and 2e-3 (fp16), where ref_fp32 runs on the same low-precision inputs upcast to fp32 and
  ref_lowp is the same-precision PyTorch reference (the flash-attention test rule).
"""


import pytest
import torch

from smarter_fast import ops
from smarter_fast.ops import BackendUnavailableError
from smarter_fast.ops.attention import ref

triton = pytest.importorskip("triton", reason="Triton is not installed: no Triton kernels to test")
from smarter_fast.ops.attention import triton as tri  # noqa: E402

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# CPU tests run in Triton's interpreter: see tests/ops/conftest.py.
NEEDS_TRITON_INTERPRETER = True


def test_in_interpreter_subprocess(rerun_in_interpreter):
    rerun_in_interpreter(__file__)


def assert_close_to_ref(got, want32, want_lowp, dtype, what):
    got, want32 = got.float(), want32.float()
    err = (got - want32).abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want32, atol=ATOL[dtype], rtol=ATOL[dtype], msg=what)
        return
    ref_err = (want_lowp.float() - want32).abs().max().item()
    assert err <= 2 * ref_err + ATOL[dtype], f"{what}: error {err:.3g} vs ref's {ref_err:.3g}"


def run_padded(B, H, L, D, dtype, lengths):
    q, k, v = (torch.randn(B, H, L, D).to(dtype) for _ in range(3))
    mask = None if lengths is None else (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])
    g = torch.randn(B, H, L, D).to(dtype)
    results = {}
    for name, cast in (("triton", None), ("ref32", torch.float32), ("reflow", None)):
        xs = [(x.to(cast) if cast else x).clone().requires_grad_() for x in (q, k, v)]
        backend = "triton" if name == "triton" else "ref"
        out = ops.attention(*xs, mask, backend=backend)
        grads = torch.autograd.grad(out, xs, g.to(out.dtype))
        results[name] = (out.detach(), *grads)
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_ref(results["triton"][i], results["ref32"][i], results["reflow"][i],
                            dtype, f"{what} {dtype} L={L} lengths={lengths}")
    return results["triton"], mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L, lengths", [(1, [1, 1]), (5, [5, 2]), (17, [17, 9])])
def test_padded_matches_ref(L, lengths, dtype):
    torch.manual_seed(L)
    run_padded(2, 3, L, 32, dtype, lengths)


def test_head_dim_64():
    torch.manual_seed(64)
    run_padded(2, 2, 17, 64, torch.float32, [17, 3])


def test_head_dim_128_is_refused_with_the_reason():
    """The tiles are sized for head dims 32 and 64; at 128 they spill registers on sm_80 and
    sm_90 (the GPU compile check), so the triton backend declines and auto passes it over."""
    q = torch.randn(1, 2, 5, 128)
    with pytest.raises(BackendUnavailableError, match="head_dim 128 not in 32/64 .*spill"):
        ops.attention(q, q, q, backend="triton")


def test_no_mask_and_fully_padded_sequence():
    torch.manual_seed(1)
    run_padded(2, 3, 5, 32, torch.float32, None)
    (out, dq, dk, dv), _ = run_padded(3, 2, 17, 32, torch.float32, [0, 17, 16])
    for t in (out, dq, dk, dv):
        assert t[0].abs().max() == 0  # a sequence with no real token: zeros everywhere


def test_padded_rows_are_zero_and_pass_no_gradient():
    torch.manual_seed(2)
    (out, dq, dk, dv), mask = run_padded(2, 3, 17, 32, torch.float32, [17, 6])
    pad = ~mask[:, None, :, None]
    for t in (out, dq, dk, dv):
        assert t.masked_select(pad).abs().max() == 0


def test_single_pass_tile(monkeypatch):
    """BLOCK_N covering the whole sequence (the GPU case for L <= 128): one softmax pass."""
    monkeypatch.setitem(tri.INTERPRET_CONFIG, "BLOCK_N", 32)
    monkeypatch.setitem(tri.INTERPRET_CONFIG, "BLOCK", 32)
    torch.manual_seed(3)
    run_padded(2, 3, 17, 32, torch.float32, [17, 11])


def test_noncontiguous_qkv_from_fused_projection():
    """The model's layout: q, k, v are permuted views of one (B, L, 3, h, D) tensor."""
    torch.manual_seed(4)
    B, L, H, D = 2, 17, 3, 32
    qkv = torch.randn(B, L, 3, H, D, requires_grad=True)
    mask = torch.arange(L)[None, :] < torch.tensor([17, 8])[:, None]
    outs, grads = [], []
    for backend in ("triton", "ref"):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = ops.attention(q, k, v, mask, backend=backend)
        y = out.transpose(1, 2).reshape(B, L, H * D)
        outs.append(y)
        grads.append(torch.autograd.grad(y, qkv, torch.ones_like(y))[0])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_matches_ref(dtype):
    torch.manual_seed(5)
    lengths = [5, 1, 17, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T, H, D = int(cu[-1]), 3, 32
    q, k, v = (torch.randn(T, H, D).to(dtype) for _ in range(3))
    g = torch.randn(T, H, D).to(dtype)
    res = {}
    for name, cast in (("triton", None), ("ref32", torch.float32), ("reflow", None)):
        xs = [(x.to(cast) if cast else x).clone().requires_grad_() for x in (q, k, v)]
        out = ops.attention_varlen(*xs, cu, max(lengths),
                                   backend="triton" if name == "triton" else "ref")
        res[name] = (out.detach(), *torch.autograd.grad(out, xs, g.to(out.dtype)))
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_ref(res["triton"][i], res["ref32"][i], res["reflow"][i], dtype,
                            f"varlen {what} {dtype}")


def test_varlen_int64_cu_seqlens():
    torch.manual_seed(6)
    cu = torch.tensor([0, 4, 9])
    q, k, v = (torch.randn(9, 2, 32) for _ in range(3))
    got = ops.attention_varlen(q, k, v, cu, 5, backend="triton")
    torch.testing.assert_close(got, ref.attention_varlen(q, k, v, cu, 5), atol=2e-5, rtol=2e-5)


def test_reasons_and_fallback():
    q = torch.randn(1, 2, 5, 48)
    with pytest.raises(BackendUnavailableError, match="head_dim 48"):
        ops.attention(q, q, q, backend="triton")
    q = torch.randn(1, 2, 5, 32)
    assert tri.check(q, q, q, dropout_p=0.1) == []  # dropout is supported
    with pytest.raises(BackendUnavailableError, match="float64"):
        ops.attention(q.double(), q.double(), q.double(), backend="triton")
    # the same reasons make auto pass triton over (checked without running the other backends)
    from smarter_fast.ops.attention import ATTENTION, ATTENTION_VARLEN
    q = torch.randn(1, 2, 5, 48)
    assert ATTENTION.backends["triton"].not_supported_reasons((q, q, q), dropout_p=0.0) == [
        "head_dim 48 not in 32/64 (the tiles are sized for BERT's head dims; larger ones spill "
        "registers on sm_80/sm_90)"]
    p = torch.randn(7, 2, 64)
    assert ATTENTION_VARLEN.backends["triton"].not_supported_reasons((p, p, p), dropout_p=0.0) == []


def test_left_padding_is_rejected_on_cpu():
    q = torch.randn(1, 2, 5, 32)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        ops.attention(q, q, q, mask, backend="triton")


def test_lengths_computed_once_per_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    a = tri.lengths_from_mask(mask, 2, 4, mask.device)
    assert a.tolist() == [3, 2] and a.dtype == torch.int32
    assert tri.lengths_from_mask(mask, 2, 4, mask.device) is a
    mask[1, 2] = 1  # an in-place change bumps the version: recomputed
    assert tri.lengths_from_mask(mask, 2, 4, mask.device).tolist() == [3, 3]


def test_opcheck_in_interpreter():
    """Schema, autograd registration and fake tensors (torch.compile's AOT tests need CUDA:
    under the interpreter the fake implementation skips the kernel; see tests/cuda)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    q, k, v = (torch.randn(2, 3, 17, 32, requires_grad=True) for _ in range(3))
    lens = torch.tensor([17, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.smarter_fast_triton.attention_fwd.default,
                          (q, k, v, lens, 17, False), test_utils=utils)
    qp, kp, vp = (torch.randn(26, 3, 32, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 17, 26], dtype=torch.int32)
    torch.library.opcheck(torch.ops.smarter_fast_triton.attention_fwd.default,
                          (qp, kp, vp, cu, 17, True), test_utils=utils)


# ---- attention dropout: the Philox mask shared with the cpp kernels and ref.dropout_keep_mask ----

P_DROP = 0.1


def _mult(seed, n_seq, H, L, p=P_DROP):
    return ref.dropout_multipliers(seed, n_seq, H, L, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L, lengths", [(17, [17, 9]), (70, [70, 33])])
def test_dropout_matches_ref_with_the_same_mask(L, lengths, dtype):
    """Forward and backward against ref applying the kernels' mask (rebuilt in PyTorch);
    L = 70 crosses the mask's 64-key chunks and several 16-wide tiles."""
    torch.manual_seed(L)
    B, H, D = 2, 2, 32
    q, k, v = (torch.randn(B, H, L, D).to(dtype) for _ in range(3))
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    g = torch.randn(B, H, L, D).to(dtype)
    torch.manual_seed(11)
    seed = ref.draw_dropout_seed()
    mult = _mult(seed, B, H, L)
    res = {}
    for name, cast in (("triton", None), ("ref32", torch.float32), ("reflow", None)):
        xs = [(x.to(cast) if cast else x).clone().requires_grad_() for x in (q, k, v)]
        if name == "triton":
            torch.manual_seed(11)  # the wrapper draws the same seed
            out = ops.attention(*xs, mask, dropout_p=P_DROP, backend="triton")
        else:
            out = ref.attention(*xs, mask, dropout_mult=mult)
        res[name] = (out.detach(), *torch.autograd.grad(out, xs, g.to(out.dtype)))
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_ref(res["triton"][i], res["ref32"][i], res["reflow"][i], dtype,
                            f"dropout {what} {dtype} L={L}")
    pad = ~mask[:, None, :, None]
    for t in res["triton"]:
        assert t.masked_select(pad).abs().max() == 0  # padded rows: zero, no gradient


def test_dropout_same_seed_same_output_and_new_draws_differ():
    torch.manual_seed(12)
    q, k, v = (torch.randn(2, 2, 17, 32) for _ in range(3))
    lens = torch.tensor([17, 5], dtype=torch.int32)
    a, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, lens, 17, False, P_DROP, 42)
    b, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, lens, 17, False, P_DROP, 42)
    c, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, lens, 17, False, P_DROP, 43)
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    ops.attention(q, k, v, dropout_p=0.0, backend="triton")
    assert torch.equal(torch.get_rng_state(), state), "no seed is drawn without dropout"


def test_dropout_drops_p_of_the_real_weights():
    """q = k = 0 and V = I: the output is P' (uniform P over the real keys)."""
    B, H, L, p = 3, 4, 32, 0.25
    lengths = [32, 20, 1]
    q = torch.zeros(B, H, L, L)
    v = torch.eye(L).expand(B, H, L, L).contiguous()
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    torch.manual_seed(13)
    out = ops.attention(q, q, v, mask, dropout_p=p, backend="triton")
    real = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(out)
    assert out[~real].abs().max() == 0
    n = torch.tensor(lengths, dtype=torch.float32)[:, None, None, None].expand_as(out)
    vals = (out * n * (1 - p))[real]
    kept = vals != 0
    torch.testing.assert_close(vals[kept], torch.ones_like(vals[kept]))
    frac = 1.0 - kept.float().mean().item()
    assert abs(frac - p) < 5 * (p * (1 - p) / kept.numel()) ** 0.5, frac


def test_dropout_is_unbiased():
    """E[out] over seeds is the output without dropout, within 5 standard errors."""
    torch.manual_seed(14)
    q, k, v = (torch.randn(1, 1, 6, 32) for _ in range(3))
    lens = torch.tensor([6], dtype=torch.int32)
    want, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, lens, 6, False)
    samples = torch.stack([torch.ops.smarter_fast_triton.attention_fwd(
        q, k, v, lens, 6, False, 0.3, seed)[0] for seed in range(300)])
    mean, sem = samples.mean(0), samples.std(0) / 300 ** 0.5
    assert ((mean - want).abs() <= 5 * sem + 1e-6).all(), (mean - want).abs().max()


def test_dropout_varlen_matches_padded_and_cpp():
    """Packed and padded inputs get the same mask for a seed (it keys on positions in the
    sequence), and so does the cpp kernel (the same Philox stream)."""
    torch.manual_seed(15)
    lengths = [5, 1, 17, 3]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T, H, D, L = int(cu[-1]), 2, 32, max(lengths)
    q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
    out, _ = torch.ops.smarter_fast_triton.attention_fwd(q, k, v, cu, L, True, P_DROP, 7)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    batch, position, _ = ref.pack_index(cu, L)

    def pad(x):
        y = x.new_zeros(len(lengths), L, H, D)
        y[batch, position] = x.detach()
        return y.transpose(1, 2).requires_grad_()

    qp, kp, vp = pad(q), pad(k), pad(v)
    lens = torch.tensor(lengths, dtype=torch.int32)
    out_p, _ = torch.ops.smarter_fast_triton.attention_fwd(qp, kp, vp, lens, L, False, P_DROP, 7)
    gp = g.new_zeros(len(lengths), L, H, D)
    gp[batch, position] = g
    grads_p = torch.autograd.grad(out_p, (qp, kp, vp), gp.transpose(1, 2))
    unpad = lambda x: x.transpose(1, 2)[batch, position]  # noqa: E731
    torch.testing.assert_close(unpad(out_p), out, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(unpad(a), b, atol=1e-6, rtol=1e-5)
    mask = torch.arange(L)[None, :] < lens[:, None]
    want = ref.attention(qp.detach(), kp.detach(), vp.detach(), mask,
                         dropout_mult=_mult(7, len(lengths), H, L))
    torch.testing.assert_close(out, unpad(want), atol=2e-5, rtol=2e-5)
    if ops.OPS["attention_varlen"].backends["cpp"].is_available():
        cpp_out, _ = torch.ops.smarter_fast.attention_varlen_fwd(q, k, v, cu, L, P_DROP, 7)
        torch.testing.assert_close(out, cpp_out, atol=2e-5, rtol=2e-5)


def test_dropout_opcheck_in_interpreter():
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    q, k, v = (torch.randn(2, 3, 17, 32, requires_grad=True) for _ in range(3))
    lens = torch.tensor([17, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.smarter_fast_triton.attention_fwd.default,
                          (q, k, v, lens, 17, False, P_DROP, 123), test_utils=utils)
    qp, kp, vp = (torch.randn(26, 3, 32, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 17, 26], dtype=torch.int32)
    torch.library.opcheck(torch.ops.smarter_fast_triton.attention_fwd.default,
                          (qp, kp, vp, cu, 17, True, P_DROP, 124), test_utils=utils)
