"""Fused dropout + residual + LayerNorm: cpp against ref (with the kernels' own mask) on fresh
random odd shapes, forward and backward, fp32 and bf16; mask statistics; opcheck; gradcheck."""

import pytest
import torch

from smarter_fast import ops
from smarter_fast.ops.layernorm import cpp as ln_cpp
from smarter_fast.ops.layernorm import ref as ln_ref

SHAPES = [(1, 1), (1, 7), (3, 5, 33), (2, 17, 384), (1, 1, 384), (5, 1, 64), (8, 23, 129)]


def _inputs(shape, dtype_x=torch.float32, dtype_h=torch.float32):
    H = shape[-1]
    x = torch.randn(shape).to(dtype_x).requires_grad_()
    h = torch.randn(shape).to(dtype_h).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(H)).requires_grad_()
    b = (0.1 * torch.randn(H)).requires_grad_()
    return x, h, w, b


def _clones(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _run_cpp(x, h, w, b, eps, p, seed):
    return torch.ops.smarter_fast.dropout_add_layer_norm(x, h, w, b, eps, p, seed)[0]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_matches_ref_fwd_bwd(shape, p, skip_unless_cpp):
    skip_unless_cpp("dropout_add_layer_norm")
    torch.manual_seed(hash((shape, p)) % 1000)
    x, h, w, b = _inputs(shape)
    x2, h2, w2, b2 = _clones(x, h, w, b)
    seed = 1234567 + shape[-1]
    got = _run_cpp(x, h, w, b, 1e-12 if shape[-1] > 1 else 1e-5, p, seed)
    mult = ln_cpp.dropout_mask(h.numel(), p, seed).view(shape)
    want = ln_ref.dropout_add_layer_norm(x2, h2, w2, b2, 1e-12 if shape[-1] > 1 else 1e-5,
                                         mult=mult)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape)
    got.backward(g)
    want.backward(g)
    for a, c in ((x, x2), (h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)])
def test_cpp_bf16_inputs(dtypes, skip_unless_cpp):
    skip_unless_cpp("dropout_add_layer_norm")
    shape = (3, 11, 96)
    x, h, w, b = _inputs(shape, *dtypes)
    x2, h2, w2, b2 = _clones(x, h, w, b)
    got = _run_cpp(x, h, w, b, 1e-12, 0.1, 99)
    assert got.dtype == torch.promote_types(*dtypes)
    mult = ln_cpp.dropout_mask(h.numel(), 0.1, 99).view(shape)
    # ref in fp32 on the same (rounded) inputs
    want = ln_ref.dropout_add_layer_norm(x2.float(), h2.float(), w2, b2, 1e-12, mult=mult)
    tol = 2e-2 if got.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    g = torch.randn(shape)
    got.backward(g.to(got.dtype))
    want.backward(g.to(got.dtype).float())
    assert x.grad.dtype == dtypes[0] and h.grad.dtype == dtypes[1]
    for a, c in ((x, x2), (h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad.float(), c.grad.float(), rtol=2e-2, atol=2e-2)


def test_cpp_under_autocast_matches_fp32(skip_unless_cpp):
    skip_unless_cpp("dropout_add_layer_norm")
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(4, 9, 64)
    w, b = torch.ones(64), torch.zeros(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.dropout_add_layer_norm(x, lin(x), w, b, 1e-12, 0.0, backend="cpp")
    assert got.dtype == torch.float32
    want = ops.dropout_add_layer_norm(x, lin(x), w, b, 1e-12, 0.0, backend="ref")
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_mask_statistics_and_determinism(skip_unless_cpp):
    skip_unless_cpp("dropout_add_layer_norm")
    n = 200_003
    m1 = ln_cpp.dropout_mask(n, 0.1, 5)
    assert torch.equal(m1, ln_cpp.dropout_mask(n, 0.1, 5))
    assert not torch.equal(m1, ln_cpp.dropout_mask(n, 0.1, 6))
    kept = (m1 > 0).double().mean().item()
    assert abs(kept - 0.9) < 0.005
    assert abs(m1.double().mean().item() - 1.0) < 0.01  # inverted dropout: unbiased
    # the op's forward uses the same mask: x = 0, check which elements of h survive
    shape = (7, 1000)
    h = torch.randn(shape)
    seed = 77
    s = torch.ops.smarter_fast.dropout_add_layer_norm(torch.zeros(shape), h, torch.ones(1000),
                                                      torch.zeros(1000), 1e-12, 0.1, seed)
    want = ln_ref.dropout_add_layer_norm(torch.zeros(shape), h, torch.ones(1000), torch.zeros(1000),
                                         1e-12, mult=ln_cpp.dropout_mask(7000, 0.1, seed).view(shape))
    torch.testing.assert_close(s[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 127, 128, 1000, 4099])
def test_cpp_mask_is_the_philox_reference(n, skip_unless_cpp):
    """The kernels' generator (whatever vector width) gives ref.dropout_multipliers' stream,
    for seeds using both key words, from the start and from an odd offset inside a row."""
    skip_unless_cpp("dropout_add_layer_norm")
    for seed, p in ((12345678901234, 0.1), (2**62 - 1, 0.5), (3, 0.9)):
        assert torch.equal(ln_cpp.dropout_mask(n, p, seed), ln_ref.dropout_multipliers(n, p, seed))
    shape = (3, 173)  # rows start mid-block: the op's mask is the flat stream's
    h = torch.randn(shape)
    s = torch.ops.smarter_fast.dropout_add_layer_norm(torch.zeros(shape), h, torch.ones(173),
                                                      torch.zeros(173), 1e-12, 0.3, 2**40 + 5)
    want = ln_ref.dropout_add_layer_norm(torch.zeros(shape), h, torch.ones(173), torch.zeros(173),
                                         1e-12, mult=ln_ref.dropout_multipliers(519, 0.3, 2**40 + 5).view(shape))
    torch.testing.assert_close(s[0], want, rtol=1e-5, atol=1e-5)


def test_cpp_mask_same_in_every_cpu_variant(skip_unless_cpp):
    """DEFAULT (scalar) and AVX2 generators, which this CPU would not pick, give the same mask."""
    skip_unless_cpp("dropout_add_layer_norm")
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = ("import torch\n"
              "from smarter_fast import ops\n"
              "from smarter_fast.ops.layernorm import cpp, ref\n"
              "for n, seed, p in ((1000, 12345678901234, 0.1), (4099, 2**62 - 1, 0.5)):\n"
              "    assert torch.equal(cpp.dropout_mask(n, p, seed), ref.dropout_multipliers(n, p, seed)), n\n"
              "print(torch.ops.smarter_fast.kernel_variant())\n")
    root = Path(__file__).resolve().parents[2]
    for cap in ("default", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap,
                   PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert cap.upper() in r.stdout.upper(), r.stdout


def test_dispatch_seeds_follow_manual_seed(skip_unless_cpp):
    skip_unless_cpp("dropout_add_layer_norm")
    x, h, w, b = _inputs((4, 5, 32))
    torch.manual_seed(3)
    y1 = ops.dropout_add_layer_norm(x, h, w, b, 1e-12, 0.2, backend="cpp")
    torch.manual_seed(3)
    y2 = ops.dropout_add_layer_norm(x, h, w, b, 1e-12, 0.2, backend="cpp")
    assert torch.equal(y1, y2)


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_no_dropout(skip_unless_cpp):
    """The fp32 kernel against finite differences of itself (no float64 kernel), loosely."""
    skip_unless_cpp("dropout_add_layer_norm")
    x, h, w, b = [t.detach().requires_grad_() for t in _inputs((2, 3, 8))]
    torch.autograd.gradcheck(lambda *a: _run_cpp(*a, 1e-5, 0.0, 0), (x, h, w, b),
                             eps=1e-2, atol=2e-2, rtol=2e-2)


def test_opcheck(skip_unless_cpp):
    skip_unless_cpp("dropout_add_layer_norm")
    x, h, w, b = _inputs((3, 5, 33))
    torch.library.opcheck(torch.ops.smarter_fast.dropout_add_layer_norm.default,
                          (x, h, w, b, 1e-12, 0.1, 42))
    torch.library.opcheck(torch.ops.smarter_fast.dropout_add_layer_norm.default,
                          (x, h.detach().bfloat16().requires_grad_(), w, b, 1e-12, 0.0, 0))
    out, xhat, rstd = torch.ops.smarter_fast.dropout_add_layer_norm(x, h, w, b, 1e-12, 0.1, 42)
    torch.library.opcheck(torch.ops.smarter_fast.dropout_add_layer_norm_backward.default,
                          (torch.randn(3, 5, 33), xhat, rstd, w.detach(), 0.1, 42,
                           torch.float32, torch.bfloat16))


def test_ref_backend_and_errors():
    x, h, w, b = _inputs((2, 3, 16))
    y = ops.dropout_add_layer_norm(x, h, w, b, 1e-12, 0.0, backend="ref")
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + h, (16,), w, b, 1e-12))
    with pytest.raises(ValueError, match="same shape"):
        ops.dropout_add_layer_norm(x, h[:, :2], w, b, 1e-12)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.dropout_add_layer_norm(x, h, w, b, 1e-12, 1.0)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_python_entry_point_grads_match_registered_autograd(p, skip_unless_cpp):
    """ops.dropout_add_layer_norm (a light autograd.Function) and the op's registered autograd
    give the same values and gradients for the same seed."""
    skip_unless_cpp("dropout_add_layer_norm")
    x, h, w, b = _inputs((4, 13, 96), torch.float32, torch.bfloat16)
    x2, h2, w2, b2 = _clones(x, h, w, b)
    torch.manual_seed(11)
    got = ops.dropout_add_layer_norm(x, h, w, b, 1e-12, p, backend="cpp")
    torch.manual_seed(11)
    seed = ln_cpp.draw_seed() if p > 0 else 0
    want = _run_cpp(x2, h2, w2, b2, 1e-12, p, seed)
    assert torch.equal(got, want)
    g = torch.randn(got.shape)
    got.backward(g)
    want.backward(g)
    for a, c in ((x, x2), (h, h2), (w, w2), (b, b2)):
        assert a.grad.dtype == c.grad.dtype
        assert torch.equal(a.grad, c.grad)


def test_layernorm_auto_takes_the_reference_for_bf16_parameters():
    from smarter_fast.model.bert import BertConfig, BertModel
    from smarter_fast.ops import dropout_add_layer_norm
    g = torch.Generator().manual_seed(0)
    x, h = (torch.randn(3, 7, 16, generator=g).bfloat16() for _ in range(2))
    w, b = torch.randn(16, generator=g).bfloat16(), torch.randn(16, generator=g).bfloat16()
    got = dropout_add_layer_norm(x, h, w, b, 1e-12, backend="auto")
    want = dropout_add_layer_norm(x, h, w, b, 1e-12, backend="ref")
    torch.testing.assert_close(got, want)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    out = BertModel(cfg).to(torch.bfloat16).eval()(torch.randint(1, 30, (2, 5)))
    assert out["pooler_output"].dtype == torch.bfloat16
