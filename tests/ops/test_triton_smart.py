"""Triton SMART kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), against ref.

Tolerances (the CUDA tests use the same): smart_mse in fp32 rtol 1e-5 (fp32 partial sums vs
torch's reduction), bf16 / fp16 rtol 1e-2 on the value (the result is rounded to the input
dtype) and one rounding of the input dtype on the gradients; smart_noise is compared
statistically (its Philox stream is not torch.randn's) and exactly for determinism.
"""


import pytest
import torch

from smarter_fast import ops

triton = pytest.importorskip("triton", reason="Triton is not installed: no Triton kernels to test")

GRAD_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 1e-2),
            torch.float16: (1e-3, 1e-3)}

# CPU tests run in Triton's interpreter: see tests/ops/conftest.py.
NEEDS_TRITON_INTERPRETER = True


def test_in_interpreter_subprocess(rerun_in_interpreter):
    rerun_in_interpreter(__file__)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (1000,), (1031,), (3, 17, 33), (9001,)])
def test_smart_mse_matches_ref(shape, dtype):
    torch.manual_seed(len(shape) + shape[-1])
    a0, b0 = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    a2, b2 = a0.float().requires_grad_(), b0.float().requires_grad_()
    got = ops.smart_mse(a, b, backend="triton")
    want = ops.smart_mse(a2, b2, backend="ref")
    assert got.shape == () and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=0)
    g = torch.rand(())
    (got * g.to(dtype)).backward()
    (want * g.to(dtype).float()).backward()
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(a.grad.float(), a2.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(b.grad, -a.grad)


def test_smart_mse_is_deterministic_and_accurate():
    a, b = torch.randn(100_003) + 3.0, torch.randn(100_003)
    first = ops.smart_mse(a, b, backend="triton")
    assert torch.equal(first, ops.smart_mse(a, b, backend="triton"))
    want = ((a.double() - b.double()) ** 2).mean().item()
    assert abs(first.item() - want) / want < 1e-6


def test_smart_mse_one_sided_and_noncontiguous():
    a = torch.randn(33, 17).t().requires_grad_()  # not contiguous
    b = torch.randn(17, 33)
    ops.smart_mse(a, b, backend="triton").backward()
    torch.testing.assert_close(a.grad, 2 * (a - b).detach() / a.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_smart_noise_distribution_determinism_and_identity_grad(dtype):
    x = torch.randn(1031, 7).to(dtype).requires_grad_()
    y = ops.smart_noise(x, 0.5, seed=1234, backend="triton")
    assert y.shape == x.shape and y.dtype == dtype
    z = ((y - x).detach().float() / 0.5).flatten()
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1.0) < 0.05
    assert torch.equal(y, ops.smart_noise(x, 0.5, seed=1234, backend="triton"))
    assert not torch.equal(y, ops.smart_noise(x, 0.5, seed=1235, backend="triton"))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_smart_noise_small_and_odd_sizes_and_large_seed():
    for n in (1, 5, 1000, 1025):
        x = torch.zeros(n)
        y = ops.smart_noise(x, 1.0, seed=2**40 + 7, backend="triton")
        assert torch.isfinite(y).all() and (y != 0).all()
    # sigma = 0 is the identity; a negative seed is folded into the 63-bit key
    x = torch.randn(17)
    assert torch.equal(ops.smart_noise(x, 0.0, seed=-3, backend="triton"), x)


def test_reasons():
    from smarter_fast.ops.smart import SMART_MSE
    x = torch.zeros(0)
    assert SMART_MSE.backends["triton"].not_supported_reasons((x, x)) == ["empty inputs"]
    d = torch.zeros(3, dtype=torch.float64)
    assert "float64" in " ".join(SMART_MSE.backends["triton"].not_supported_reasons((d, d)))


def test_opcheck_in_interpreter():
    """Schema, autograd registration and fake tensors (AOT dispatch is tested on CUDA)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    a, b = (torch.randn(1031, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.smarter_fast_triton.smart_mse.default, (a, b),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.smarter_fast_triton.smart_noise.default, (a, 0.1, 5),
                          test_utils=utils)
