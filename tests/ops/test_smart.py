"""SMART ops: every backend against ref (and math) on fresh random odd shapes, fwd and bwd."""

import pytest
import torch

from smarter_fast import ops


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (8, 384), (2, 17, 33)])
def test_smart_mse_cpp_matches_ref(shape, skip_unless_cpp):
    skip_unless_cpp("smart_mse")
    a = torch.randn(shape, requires_grad=True)
    b = torch.randn(shape, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    got = ops.smart_mse(a, b, backend="cpp")
    want = ops.smart_mse(a2, b2, backend="ref")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # fp32, double accumulation
    g = torch.rand(())
    (got * g).backward()
    (want * g).backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-6, atol=1e-7)


def test_smart_mse_gradcheck_and_one_sided(skip_unless_cpp):
    skip_unless_cpp("smart_mse")
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(5, 3)  # only one side needs a gradient
    ops.smart_mse(a, b, backend="cpp").backward()
    torch.testing.assert_close(a.grad, 2 * (a - b).detach() / a.numel())


def test_smart_mse_large_input_is_accurate(skip_unless_cpp):
    skip_unless_cpp("smart_mse")
    a, b = torch.randn(1_000_003) + 3.0, torch.randn(1_000_003)
    want = ((a.double() - b.double()) ** 2).mean()
    assert abs(ops.smart_mse(a, b, backend="cpp").item() - want.item()) / want.item() < 1e-6


def test_smart_mse_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        ops.smart_mse(torch.randn(3), torch.randn(4))


@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7, 33), (4, 17, 384)])
def test_smart_noise_statistics_determinism_and_identity_grad(backend, shape, skip_unless_cpp):
    if backend == "cpp":
        skip_unless_cpp("smart_noise")
    x = torch.randn(shape, requires_grad=True)
    sigma = 0.05
    y1 = ops.smart_noise(x, sigma, seed=11, backend=backend)
    y2 = ops.smart_noise(x, sigma, seed=11, backend=backend)
    y3 = ops.smart_noise(x, sigma, seed=12, backend=backend)
    assert torch.equal(y1, y2), "same seed, same backend: same noise"
    if x.numel() > 1:
        assert not torch.equal(y1, y3), "another seed: other noise"
    g = torch.randn(shape)
    y1.backward(g)
    torch.testing.assert_close(x.grad, g)  # the gradient is the identity
    if x.numel() >= 10_000:
        z = (y1 - x).detach() / sigma
        assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03


def test_smart_noise_sigma_zero_is_identity(skip_unless_cpp):
    skip_unless_cpp("smart_noise")
    x = torch.randn(4, 9)
    assert torch.equal(ops.smart_noise(x, 0.0, seed=3, backend="cpp"), x)


def test_opcheck_smart_ops(skip_unless_cpp):
    skip_unless_cpp("smart_mse")
    skip_unless_cpp("smart_noise")
    a = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.smarter_fast.smart_mse.default, (a, b))
    torch.library.opcheck(torch.ops.smarter_fast.smart_mse_backward.default,
                          (torch.tensor(1.5), a.detach(), b.detach()))
    torch.library.opcheck(torch.ops.smarter_fast.smart_noise.default, (a, 0.1, 7))
