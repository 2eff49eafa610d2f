"""C++ SMART ops (csrc/kernels/kernels_impl.h): fake and autograd registrations.

smart_noise draws Philox4x32-10 normals keyed by (seed, element index), so the noise is never
stored and its gradient is the identity; smart_mse is one fused pass forward and backward.
"""

import torch

from ..registry import cpp_availability


def register() -> None:
    """Adds the Python-side registrations once the extension has defined the ops."""

    @torch.library.register_fake("smarter_fast::smart_mse")
    def _(a, b):
        torch._check(a.shape == b.shape, lambda: "smart_mse: a and b must have the same shape")
        return a.new_empty(())

    @torch.library.register_fake("smarter_fast::smart_mse_backward")
    def _(grad, a, b):
        return torch.empty_like(a), torch.empty_like(b)

    def mse_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def mse_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = torch.ops.smarter_fast.smart_mse_backward(grad, a, b)
        return grad_a, grad_b

    torch.library.register_autograd("smarter_fast::smart_mse", mse_backward,
                                    setup_context=mse_setup)

    @torch.library.register_fake("smarter_fast::smart_noise")
    def _(x, sigma, seed):
        return torch.empty_like(x)

    def noise_backward(ctx, grad):
        return grad, None, None  # x + sigma * z: identity in x

    torch.library.register_autograd("smarter_fast::smart_noise", noise_backward)



mse_availability = cpp_availability("smart_mse", register)
noise_availability = cpp_availability("smart_noise", register)


def smart_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    return torch.ops.smarter_fast.smart_noise(x, float(sigma), int(seed))


def smart_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.smarter_fast.smart_mse(a, b)
