"""SMART ops: noise injection on the embedding output and the mean-squared consistency term."""

import torch

from ..registry import Backend, FLOAT_DTYPES, any_device, cpu_only, op, triton_devices
from . import cpp, ref, triton

_F32 = (torch.float32,)

SMART_NOISE = op("smart_noise")
SMART_NOISE.register(Backend("triton", triton.smart_noise, triton_devices, triton.DTYPES,
                             triton.availability, triton.check))
SMART_NOISE.register(Backend("cpp", cpp.smart_noise, cpu_only, _F32, cpp.noise_availability))
SMART_NOISE.register(Backend("ref", ref.smart_noise, any_device, FLOAT_DTYPES, lambda: None))

SMART_MSE = op("smart_mse")
SMART_MSE.register(Backend("triton", triton.smart_mse, triton_devices, triton.DTYPES,
                           triton.availability, triton.mse_check))
SMART_MSE.register(Backend("cpp", cpp.smart_mse, cpu_only, _F32, cpp.mse_availability))
SMART_MSE.register(Backend("ref", ref.smart_mse, any_device, FLOAT_DTYPES, lambda: None))


def smart_noise(x: torch.Tensor, sigma: float, seed: int, backend: str = "auto") -> torch.Tensor:
    """x + sigma * N(0, 1). The same seed on the same backend gives the same noise; the noise
    is not kept for the backward pass (the gradient with respect to x is the identity)."""
    return SMART_NOISE.select(backend, (x,)).fn(x, sigma, seed)


def smart_mse(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """mean((a - b)^2) as a 0-d tensor, with gradients to both inputs."""
    if a.shape != b.shape:
        raise ValueError(f"smart_mse: shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return SMART_MSE.select(backend, (a, b)).fn(a, b)


__all__ = ["smart_noise", "smart_mse"]
