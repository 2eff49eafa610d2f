"""Gradient surgery on the shared encoder: PCGrad (Yu et al. 2020) and GradVac (Wang et al. 2021).

A surgery step takes one batch of every task. Each task in turn runs forward and backward (so
only one task's graph is alive at a time); its encoder gradient is copied into row t of a flat
(T, D) buffer and the encoder grads are cleared, while the task heads (each used by one task
only) keep their gradients as they are. The rows are then combined and written back as the
encoder's gradient, and the optimizer steps as usual.

Both algorithms only ever add multiples of the original g_j to a g_i, so they run on the rows'
(T, T) Gram matrix (`gram`, float64): each result is sum_k A[i, k] g_k, every dot product and norm
they need is a small product with the Gram matrix, and the D-vectors are read twice a step (the
Gram matrix, then the weighted sum) instead of copied to float64 for every pair (against the
per-vector form: benchmarks/bench_surgery.py). The per-vector forms
(`pcgrad_reference`, `GradVac.reference`) are kept as the tests' reference.

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

# Columns per block of gram(): small enough for a (T, block) slice to stay in cache, large enough
# that a block's float32 dot products round no worse than 1e-6 relative (the blocks' partial sums
# are added in float64).
GRAM_BLOCK = 1 << 16


def gram(grads: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """The (T, T) Gram matrix grads @ grads.T of (T, D) gradients, in float64: float32 products
    per block of columns, summed in float64 (one float32 GEMM over D = 22.7M columns is off by
    about 2.5e-3 relative; a float64 copy of grads costs a pass more)."""
    T = grads.shape[0]
    out = torch.zeros(T, T, dtype=torch.float64, device=grads.device)
    for cols in grads.split(block, dim=1):
        out += cols @ cols.T
    return out


def _weighted_sum(grads: torch.Tensor, weights, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[k] * grads[k] (float32), streaming over the rows (a (T,) @ (T, D) product
    reads grads column-wise, which is slower)."""
    weights = [float(w) for w in weights]
    out = torch.mul(grads[0], weights[0], out=out)
    for row, w in zip(grads[1:], weights[1:]):
        out.add_(row, alpha=w)
    return out


def _apply_weights(grads: torch.Tensor, A: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined (D,), rows (T, D)) of the rows sum_k A[i, k] g_k."""
    rows = torch.from_numpy(A).to(grads.dtype).to(grads.device) @ grads
    return _weighted_sum(grads, A.sum(0)), rows


def pcgrad_weights(gram_matrix, rng: np.random.Generator) -> np.ndarray:
    """PCGrad on gradients given by their Gram matrix: A (T, T) float64 with projected g_i =
    sum_k A[i, k] g_k. Each projection changes g_i by a multiple of one original g_j, so every
    dot product the algorithm needs is A[i] @ gram[:, j]: no pass over the D-vectors."""
    K = np.asarray(gram_matrix, dtype=np.float64)
    T = K.shape[0]
    A = np.eye(T)
    for i in range(T):
        for j in rng.permutation(T):
            if j == i:
                continue
            dot = A[i] @ K[:, j]
            if dot < 0 and K[j, j] > 0:
                A[i, j] -= dot / K[j, j]
    return A


def pcgrad(grads: torch.Tensor, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """grads (T, D) -> (combined (D,), projected (T, D)), through pcgrad_weights (dot products in
    float64 from gram())."""
    rng = rng or np.random.default_rng(0)
    return _apply_weights(grads, pcgrad_weights(gram(grads).cpu().numpy(), rng))


def pcgrad_reference(grads: torch.Tensor, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad as the paper writes it, on the D-vectors themselves (float64 dot products): the
    reference the Gram-matrix form is tested and benchmarked against."""
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

    def weights(self, gram_matrix, rng: np.random.Generator) -> np.ndarray:
        """A (T, T) float64 with adjusted g_i = sum_k A[i, k] g_k, from the Gram matrix (as
        pcgrad_weights: |g_i|^2 = A[i] K A[i], g_i . g_j = A[i] K[:, j]); updates the targets."""
        K = np.asarray(gram_matrix, dtype=np.float64)
        T = K.shape[0]
        A = np.eye(T)
        for i in range(T):
            for j in rng.permutation(T):
                if j == i:
                    continue
                ni, nj = math.sqrt(max(A[i] @ K @ A[i], 0.0)), math.sqrt(max(K[j, j], 0.0))
                if ni == 0 or nj == 0:
                    continue
                phi = min(max(float(A[i] @ K[:, j]) / (ni * nj), -1.0), 1.0)
                tgt = float(self.target[i, j])
                if phi < tgt:
                    A[i, j] += ni * (tgt * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - tgt ** 2)) / (
                        nj * math.sqrt(max(1 - tgt ** 2, 1e-12)))
                self.target[i, j] = (1 - self.beta) * tgt + self.beta * phi
        return A

    def __call__(self, grads: torch.Tensor, rng: np.random.Generator | None = None):
        """grads (T, D) -> (combined (D,), adjusted (T, D)); updates the targets."""
        rng = rng or np.random.default_rng(0)
        return _apply_weights(grads, self.weights(gram(grads).cpu().numpy(), rng))

    def reference(self, grads: torch.Tensor, rng: np.random.Generator | None = None):
        """GradVac on the D-vectors themselves (float64 norms and dot products), as __call__
        (targets updated): the reference the Gram-matrix form is tested against."""
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
        self.target = torch.as_tensor(sd["target"], dtype=torch.float64).clone()


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
        # The combined gradient, kept from step to step (a fresh 90 MB tensor per step costs its
        # page faults); the encoder's grads are views of it until the next combine().
        self.combined = torch.empty(D, dtype=torch.float32, device=ref.device)
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
        """Combine the rows of the tasks `present` (default all) and write the encoder grads.
        The algorithms run on the rows' float64 Gram matrix (T x T): one pass over the rows for
        it and one for the weighted sum, whatever T."""
        rows = [self.tasks.index(t) for t in (present or self.tasks)]
        G = self.buffer if rows == list(range(len(self.tasks))) else self.buffer[rows]
        K = gram(G)
        norms = K.diagonal().sqrt().clamp(min=1e-30)
        self.last_cosines = (K / norms[:, None] / norms[None, :]).float()
        K = K.cpu().numpy()
        if not np.isfinite(K).all():
            # A non-finite gradient: sum the rows as they are (the trainer sees the non-finite
            # result and skips the step) and leave GradVac's targets alone, which one NaN cosine
            # would otherwise poison for the rest of the run.
            A = np.eye(len(rows))
        elif self.method == "pcgrad":
            A = pcgrad_weights(K, self.rng)
        elif len(rows) == len(self.tasks):
            A = self.gradvac.weights(K, self.rng)
        else:  # a task without data this step: plain sum
            A = np.eye(len(rows))
        combined = _weighted_sum(G, A.sum(0), out=self.combined)
        off = 0
        for p, n in zip(self.params, self.sizes):
            p.grad = combined[off:off + n].view_as(p)
            off += n

    def state_dict(self) -> dict:
        """JSON-ready (it goes into trainer_state.json): the method, GradVac's targets and the
        generator of the pair orders."""
        gv = self.gradvac.state_dict() if self.gradvac else None
        return {"method": self.method, "rng": self.rng.bit_generator.state,
                "gradvac": {"beta": gv["beta"], "target": gv["target"].tolist()} if gv else None}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("method", self.method) != self.method:
            raise ValueError(f"gradient surgery state is for {sd['method']!r}, this run uses {self.method!r}")
        if sd.get("rng") is not None:
            self.rng.bit_generator.state = sd["rng"]
        if self.gradvac is not None and sd.get("gradvac"):
            self.gradvac.load_state_dict(sd["gradvac"])


__all__ = ["SURGERIES", "gram", "pcgrad", "pcgrad_weights", "pcgrad_reference", "GradVac",
           "GradientSurgery"]
