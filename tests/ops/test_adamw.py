"""The fused AdamW step: every backend against an independent float64 computation."""

import math

import pytest
import torch

from smarter_fast import ops


def reference_step(p, g, m, v, lr, b1, b2, eps, wd, step, correct_bias):
    """The CS224N minBERT semantics written out in float64."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    size = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step) if correct_bias else lr
    p = p - size * m / (v.sqrt() + eps)
    p = p - lr * wd * p
    return p, m, v


def normwise(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("n", [1, 13, 1031, 300_007])
@pytest.mark.parametrize("step,correct_bias,wd", [(1, True, 0.0), (7, True, 0.01), (3, False, 0.1)])
def test_adamw_step_matches_reference(backend, n, step, correct_bias, wd, skip_unless_cpp):
    if backend == "cpp":
        skip_unless_cpp("adamw")
    p = torch.randn(n)
    g = torch.randn(n) * 0.1
    m = torch.randn(n) * 0.01
    v = torch.rand(n) * 1e-3 + 1e-8
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=wd, step=step,
              correct_bias=correct_bias)
    want = reference_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, wd, step, correct_bias)
    ops.adamw_step_(p, g, m, v, backend=backend, **hp)
    for got, w in zip((p, m, v), want):
        assert normwise(got, w) <= 1e-6


def test_adamw_first_step_by_hand(skip_unless_cpp):
    skip_unless_cpp("adamw")
    # t = 1, zero moments: m = 0.1 g, v = 0.001 g^2, step size lr sqrt(0.001) / 0.1, so the
    # update is lr * g / (|g| + eps / sqrt(0.001)) = lr * sign(g), up to eps.
    g = torch.tensor([0.5, -2.0, 3.0])
    p = torch.tensor([1.0, 1.0, 1.0])
    ops.adamw_step_(p, g, torch.zeros(3), torch.zeros(3), lr=0.01, step=1, eps=1e-8,
                    backend="cpp")
    torch.testing.assert_close(p, torch.tensor([0.99, 1.01, 0.99]), rtol=0, atol=1e-6)


def test_adamw_cpp_needs_contiguous_buffers(skip_unless_cpp):
    skip_unless_cpp("adamw")
    p = torch.randn(4, 6).t()  # not contiguous
    args = (p, torch.randn(6, 4), torch.zeros(6, 4), torch.zeros(6, 4))
    with pytest.raises(ops.BackendUnavailableError, match="needs contiguous param"):
        ops.adamw_step_(*args, lr=1e-3, step=1, backend="cpp")
    ops.adamw_step_(*args, lr=1e-3, step=1)  # auto falls back to ref


def test_opcheck_adamw(skip_unless_cpp):
    skip_unless_cpp("adamw")
    args = (torch.randn(37), torch.randn(37), torch.zeros(37), torch.zeros(37),
            1e-3, 0.9, 0.999, 1e-6, 0.01, 1, True)
    torch.library.opcheck(torch.ops.smarter_fast.adamw_step_.default, args)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("n,offset,count", [(1, 0, 1), (1031, 17, 1000), (300_007, 65_537, 131_071),
                                            (300_007, 0, 300_007)])
def test_adamw_step_writes_the_bf16_copy(backend, n, offset, count, skip_unless_cpp):
    """copy = bf16(updated param[offset:offset + count]) bit for bit as torch casts; the update
    itself is the same as without a copy; elements outside the copy's range are not touched."""
    if backend == "cpp":
        skip_unless_cpp("adamw")
    torch.manual_seed(n + offset)
    p, g = torch.randn(n), torch.randn(n) * 0.1
    m, v = torch.randn(n) * 0.01, torch.rand(n) * 1e-3 + 1e-8
    plain = [t.clone() for t in (p, g, m, v)]
    copy = torch.full((count,), 7.0, dtype=torch.bfloat16)
    hp = dict(lr=1e-3, weight_decay=0.01, step=4, backend=backend)
    ops.adamw_step_(p, g, m, v, copy=copy, copy_offset=offset, **hp)
    ops.adamw_step_(*plain, **hp)
    for got, want in zip((p, m, v), (plain[0], plain[2], plain[3])):
        assert torch.equal(got, want)
    assert torch.equal(copy.view(torch.int16), p[offset:offset + count].bfloat16().view(torch.int16))


def test_adamw_step_copy_errors():
    p = torch.randn(10)
    args = (p, torch.randn(10), torch.zeros(10), torch.zeros(10))
    with pytest.raises(ValueError, match="does not fit"):
        ops.adamw_step_(*args, lr=1e-3, step=1, copy=torch.zeros(4, dtype=torch.bfloat16),
                        copy_offset=7)
    with pytest.raises(ValueError, match="contiguous bfloat16"):
        ops.adamw_step_(*args, lr=1e-3, step=1, copy=torch.zeros(4), copy_offset=0)


def test_opcheck_adamw_with_copy(skip_unless_cpp):
    skip_unless_cpp("adamw")
    args = (torch.randn(37), torch.randn(37), torch.zeros(37), torch.zeros(37),
            1e-3, 0.9, 0.999, 1e-6, 0.01, 1, True, torch.zeros(20, dtype=torch.bfloat16), 9)
    torch.library.opcheck(torch.ops.smarter_fast.adamw_step_.default, args)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
def test_adamw_step_rejects_a_gradient_of_another_shape_and_step_0(backend):
    from smarter_fast.ops import adamw_step_
    p = torch.randn(4, 3)
    with pytest.raises(ValueError, match="grad has shape \\(3,\\), param \\(4, 3\\)"):
        adamw_step_(p, torch.randn(3), torch.zeros(4, 3), torch.zeros(4, 3), lr=1e-3, step=1,
                    backend=backend)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        adamw_step_(p, torch.randn(4, 3), torch.zeros(4, 3), torch.zeros(12), lr=1e-3, step=1,
                    backend=backend)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_step_(p, torch.randn(4, 3), torch.zeros(4, 3), torch.zeros(4, 3), lr=1e-3, step=0,
                    backend=backend)
