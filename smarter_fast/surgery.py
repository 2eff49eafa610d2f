"""Gradient surgery on the shared encoder: PCGrad (Yu et al. 2020) and GradVac (Wang et al. 2021).

A surgery step takes one batch of every task. Each task in turn runs forward and backward (so
only one task's graph is alive at a time); its encoder gradient is copied into row t of a flat
(T, D) buffer and the encoder grads are cleared, while the task heads (each used by one task
only) keep their gradients as they are. The rows are then combined and written back as the
encoder's gradient, and the optimizer steps as usual.

- PCGrad: for each task i, for the other tasks j in random order: if g_i . g_j < 0, project g_i
  onto the normal plane of g_j (g_i -= (g_i . g_j) / |g_j|^2 g_j). The result is the sum of the
  projected g_i. Gradients that do not conflict are left as they are.
- GradVac: keeps an EMA target cosine similarity phi^_ij per task pair (start 0, rate beta 0.01).
  For each i and other j in random order, phi = cos(g_i, g_j); if phi < phi^_ij, g_i gets
      g_i += |g_i| (phi^ sqrt(1 - phi^2) - phi sqrt(1 - phi^^2)) / (|g_j| sqrt(1 - phi^^2)) g_j
  (so that cos(g_i, g_j) becomes phi^_ij), and phi^_ij <- (1 - beta) phi^_ij + beta phi. The
  paper applies it per layer or per model; here one vector for the whole encoder.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SURGERIES = ("off", "pcgrad", "gradvac")


def pcgrad(grads: torch.Tensor, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """grads (T, D) -> (combined (D,), projected (T, D)). Works in float64 for the dot products."""
    rng = rng or np.random.default_rng(0)
    T = grads.shape[0]
    out = grads.clone()
    for i in range(T):
        gi = out[i]
        for j in rng.permutation(T):
            if j == i:
                continue
            gj = grads[j]
            dot = torch.dot(gi.double(), gj.double())
            if dot < 0:
                nn = torch.dot(gj.double(), gj.double())
                if nn > 0:
                    gi.sub_(gj, alpha=float(dot / nn))
    return out.sum(0), out


class GradVac:
    def __init__(self, n_tasks: int, beta: float = 0.01):
        self.beta = float(beta)
        self.target = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)

    def __call__(self, grads: torch.Tensor, rng: np.random.Generator | None = None):
        """grads (T, D) -> (combined (D,), adjusted (T, D)); updates the targets."""
        rng = rng or np.random.default_rng(0)
        T = grads.shape[0]
        out = grads.clone()
        for i in range(T):
            gi = out[i]
            for j in rng.permutation(T):
                if j == i:
                    continue
                gj = grads[j]
                ni, nj = float(gi.double().norm()), float(gj.double().norm())
                if ni == 0 or nj == 0:
                    continue
                phi = float(torch.dot(gi.double(), gj.double())) / (ni * nj)
                phi = min(max(phi, -1.0), 1.0)
                tgt = float(self.target[i, j])
                if phi < tgt:
                    coef = ni * (tgt * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - tgt ** 2)) / (
                        nj * math.sqrt(max(1 - tgt ** 2, 1e-12)))
                    gi.add_(gj, alpha=coef)
                self.target[i, j] = (1 - self.beta) * tgt + self.beta * phi
        return out.sum(0), out

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.beta = float(sd["beta"])
        self.target = sd["target"].clone().double()


class GradientSurgery:
    """Collects per-task encoder gradients into a flat (T, D) buffer and combines them."""

    def __init__(self, model, tasks, method: str = "pcgrad", seed: int = 0):
        if method not in ("pcgrad", "gradvac"):
            raise ValueError(f"unknown gradient surgery {method!r}; expected pcgrad or gradvac")
        self.method, self.tasks = method, list(tasks)
        self.params = [p for p in model.bert.parameters() if p.requires_grad]  # heads excluded
        self.sizes = [p.numel() for p in self.params]
        D = sum(self.sizes)
        ref = self.params[0]
        self.buffer = torch.zeros(len(self.tasks), D, dtype=torch.float32, device=ref.device)
        self.rng = np.random.default_rng([seed, 0x9C6])
        self.gradvac = GradVac(len(self.tasks)) if method == "gradvac" else None
        self.last_cosines: torch.Tensor | None = None

    @torch.no_grad()
    def collect(self, task: str) -> None:
        """Move the encoder's current grads into the task's row and clear them."""
        row = self.buffer[self.tasks.index(task)]
        off = 0
        for p, n in zip(self.params, self.sizes):
            if p.grad is None:
                row[off:off + n].zero_()
            else:
                row[off:off + n].copy_(p.grad.reshape(-1))
                p.grad = None
            off += n

    @torch.no_grad()
    def combine(self, present=None) -> None:
        """Combine the rows of the tasks `present` (default all) and write the encoder grads."""
        rows = [self.tasks.index(t) for t in (present or self.tasks)]
        G = self.buffer[rows]
        Gd = G.double()
        norms = Gd.norm(dim=1).clamp(min=1e-30)
        self.last_cosines = ((Gd @ Gd.T) / norms[:, None] / norms[None, :]).float()
        if self.method == "pcgrad":
            combined, _ = pcgrad(G, self.rng)
        else:
            if len(rows) == len(self.tasks):
                combined, _ = self.gradvac(G, self.rng)
            else:  # a task without data this step: plain sum
                combined = G.sum(0)
        off = 0
        for p, n in zip(self.params, self.sizes):
            p.grad = combined[off:off + n].view_as(p).clone()
            off += n

    def state_dict(self) -> dict:
        return {"method": self.method, "gradvac": self.gradvac.state_dict() if self.gradvac else None}

    def load_state_dict(self, sd: dict) -> None:
        if self.gradvac is not None and sd.get("gradvac"):
            self.gradvac.load_state_dict(sd["gradvac"])


__all__ = ["SURGERIES", "pcgrad", "GradVac", "GradientSurgery"]
