"""Triton AdamW on CPU through Triton's interpreter (TRITON_INTERPRET=1), against ref.

Both entry points (host step count, and the graph-capturable device-tensor step) over several
steps on odd sizes. Tolerance (CUDA tests too): fp32, atol 1e-6 / rtol 1e-5 on parameters and
moments after the steps - a few ulps, from fused multiply-adds and the fp32 step size.
"""


import pytest
import torch

from smarter_fast import ops
from smarter_fast.ops.adamw import ref

triton = pytest.importorskip("triton", reason="Triton is not installed: no Triton kernels to test")
from smarter_fast.ops.adamw import triton as tri  # noqa: E402

# CPU tests run in Triton's interpreter: see tests/ops/conftest.py.
NEEDS_TRITON_INTERPRETER = True


def test_in_interpreter_subprocess(rerun_in_interpreter):
    rerun_in_interpreter(__file__)


def _state(n, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g)
    m = torch.randn(n, generator=g) * 0.1
    v = torch.rand(n, generator=g) * 0.01
    return p, m, v


@pytest.mark.parametrize("n", [1, 1000, 1031, 5000])
@pytest.mark.parametrize("wd, correct_bias", [(0.0, True), (0.01, True), (0.1, False)])
@pytest.mark.parametrize("entry", ["int_step", "tensor_step", "tensor_step_and_lr"])
def test_adamw_matches_ref(n, wd, correct_bias, entry):
    p, m, v = _state(n, n)
    want = [t.clone() for t in (p, m, v)]
    got = [t.clone() for t in (p, m, v)]
    step_t = torch.zeros((), dtype=torch.float32)  # torch optimizers keep a float step tensor
    lr = 2e-3
    for step in (1, 2, 3, 10):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(step))
        ref.adamw_step_(want[0], grad, want[1], want[2], lr, 0.9, 0.999, 1e-6, wd, step,
                        correct_bias)
        if entry == "int_step":
            ops.adamw_step_(got[0], grad, got[1], got[2], lr=lr, beta1=0.9, beta2=0.999,
                            eps=1e-6, weight_decay=wd, step=step, correct_bias=correct_bias,
                            backend="triton")
        else:
            step_t.fill_(step)
            lr_arg = torch.tensor(lr) if entry == "tensor_step_and_lr" else lr
            tri.adamw_step_tensor_(got[0], grad, got[1], got[2], lr_arg, 0.9, 0.999, 1e-6, wd,
                                   step_t, correct_bias)
    for a, b, what in zip(got, want, ("param", "exp_avg", "exp_avg_sq")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=what)


def test_device_step_bias_correction_at_large_steps():
    """beta^t on the device (float64 by squaring) matches the host formula at any step."""
    for step in (1, 7, 1000, 123_457):
        p, m, v = _state(64, step)
        want = [t.clone() for t in (p, m, v)]
        grad = torch.randn(64)
        ref.adamw_step_(want[0], grad, want[1], want[2], 1e-3, 0.9, 0.999, 1e-8, 0.0, step)
        tri.adamw_step_tensor_(p, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                               torch.tensor(step, dtype=torch.int64))
        torch.testing.assert_close(p, want[0], atol=1e-7, rtol=1e-6)


def test_reasons():
    from smarter_fast.ops.adamw import ADAMW
    x = torch.zeros(4, 4).t()
    y = torch.zeros(16)
    assert ADAMW.backends["triton"].not_supported_reasons((x, y, y, y)) == [
        "needs contiguous param"]


def test_opcheck_in_interpreter():
    """Schema (mutation annotations) and fake tensors (AOT dispatch is tested on CUDA)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    p, m, v = _state(1031, 0)
    g = torch.randn(1031)
    torch.library.opcheck(torch.ops.smarter_fast_triton.adamw_step_.default,
                          (p, g, m, v, 1e-3, 0.9, 0.999, 1e-6, -1e-5), test_utils=utils)
    torch.library.opcheck(torch.ops.smarter_fast_triton.adamw_step_tensor_.default,
                          (p, g, m, v, torch.ones(()), torch.tensor(1e-3), 0.0, 0.9, 0.999, 1e-6,
                           0.01, True), test_utils=utils)


@pytest.mark.parametrize("n,offset,count", [(1031, 17, 1000), (5000, 0, 5000)])
def test_adamw_writes_the_bf16_copy(n, offset, count):
    """The triton backend's copy (cast after its kernel) is bf16 of its updated param."""
    p, m, v = _state(n, n + 1)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5))
    copy = torch.full((count,), 3.0, dtype=torch.bfloat16)
    ops.adamw_step_(p, grad, m, v, lr=1e-3, step=2, copy=copy, copy_offset=offset,
                    backend="triton")
    assert torch.equal(copy.view(torch.int16), p[offset:offset + count].bfloat16().view(torch.int16))
