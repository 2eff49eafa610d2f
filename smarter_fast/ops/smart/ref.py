"""Pure-PyTorch SMART ops: the oracle for the other backends and the last fallback."""

import torch


def smart_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """x + sigma * N(0, 1), the noise drawn from a generator seeded with `seed`."""
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + sigma * noise


def smart_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a - b)^2), differentiable in both inputs."""
    return torch.mean((a - b) ** 2)
