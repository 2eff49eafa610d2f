"""SMART regularisation, the simple form of "SMARTer BERT" (the report's Algorithm 1).

    E      = model.bert.embed(input_ids, token_type_ids)        # once
    E'     = E + sigma * N(0, 1)                                  # ops.smart_noise, seeded
    clean  = heads(task, E),  perturbed = heads(task, E')         # the same encoder and head
    loss   = task_loss(clean, y) + lambda * mean((clean - perturbed)^2)   # ops.smart_mse

Gradients flow through both branches (and through the noise, whose gradient is the identity, back
into the shared embeddings). The model outputs compared are the raw task outputs: SST logits (B, 5),
Quora logits (B,), STS scores (B,).

Full SMART (Jiang et al. 2019, `--smart full`, `smart_full_loss`), as in the official mt-dnn
implementation (mt_dnn/perturbation.py, SmartPerturbation):

    E      = model.bert.embed(...)                         # once, with the training dropout
    clean  = heads(task, E)                                # training mode (dropout as configured)
    delta  ~ N(0, sigma^2)                                 # per embedding element (padding zeroed)
    K times:   g = d/d delta  D(heads(task, E.detach() + delta), clean.detach())
               delta = (delta + eta g) / (max_h |delta + eta g| + 1e-6)    # per token, L-inf
               (or, with projection: delta = clip(delta + eta g / max_h|g|, -epsilon, epsilon))
    term   = D(heads(task, E + delta), clean)              # gradient to both branches
    total  = task loss + lambda * term  [+ mu * D(clean, teacher(x))  with --smart-full-bregman]

D is the symmetric divergence of the task's output distribution (`symmetric_divergence`):
symmetric KL of the softmax for SST, of the Bernoulli(sigmoid) for Quora, squared error for STS.
The adversarial passes run with dropout off by default (`keep_dropout=True` keeps it). The
momentum Bregman proximal point uses a mean-teacher EMA of the parameters (`EmaTeacher`,
beta 0.995): its output (no dropout, no gradient) anchors the student's clean output.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import ops
from .ema import WeightEma
from ..tasks import task as task_named, task_loss

SMART_MODES = ("off", "simple", "full")


def step_seed(run_seed: int, step: int) -> int:
    """Noise seed for a global training step: different every step, fixed by the run seed."""
    return (int(run_seed) * 1_000_003 + int(step) * 7919 + 12345) % (2 ** 31 - 1)


def task_forward(model, task: str, batch: dict) -> torch.Tensor:
    """Plain forward of a padded batch for task 'sst' | 'quora' | 'sts'."""
    spec = task_named(task)
    type_ids = batch.get("token_type_ids") if spec.is_pair else None
    return model(spec.head, batch["input_ids"], batch["attention_mask"], type_ids)


def _fuse_rows(tensors, parts: int) -> torch.Tensor:
    """Concatenate batches for one fused pass. Pair batches in the stacked layout (bi / both:
    `parts` blocks of B rows, [s1; s2] or [pair; s1; s2]) are joined block by block,
    [a_1; b_1; a_2; b_2; ...], which the model reads as one stacked batch of 2B examples whose
    first B are a's and last B are b's; plain batches (parts 1) are simply stacked."""
    if parts == 1:
        return torch.cat(tensors)
    blocks = [t.split(t.shape[0] // parts) for t in tensors]
    return torch.cat([block for group in zip(*blocks) for block in group])


def smart_simple_loss(model, task: str, batch: dict, sigma: float, lam: float, seed: int,
                      backend: str = "auto", fuse_batch: bool | None = None,
                      label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, task loss, SMART term, clean output) for one padded batch.

    total = task loss + lam * smart_mse(clean, perturbed); the SMART term returned is the
    unweighted mean squared difference. With `fuse_batch` (default: on CUDA) the clean and
    perturbed passes run as one encoder pass over a batch of 2B, which keeps a GPU busy at small
    batch sizes; on CPU two passes of B cost the same and need less memory. Each half draws its
    own dropout masks either way, as two separate passes would.
    """
    spec = task_named(task)
    head = spec.head
    type_ids = batch.get("token_type_ids") if spec.is_pair else None
    mask = batch["attention_mask"]
    # (N, L, H), computed once; N = B, or 2B / 3B rows for bi / both pair batches (stacked)
    E = model.bert.embed(batch["input_ids"], type_ids)
    E_noisy = ops.smart_noise(E, sigma, seed, backend=backend)
    if fuse_batch is None:
        fuse_batch = E.is_cuda
    if fuse_batch:
        parts = model.rows_per_example(head)
        both = model.heads_from_embeddings(head, _fuse_rows([E, E_noisy], parts),
                                           _fuse_rows([mask, mask], parts))
        n = both.shape[0] // 2  # outputs: B clean, then B perturbed
        clean, perturbed = both[:n], both[n:]
    else:
        clean = model.heads_from_embeddings(head, E, mask)
        perturbed = model.heads_from_embeddings(head, E_noisy, mask)
    loss = task_loss(task, clean, batch["labels"], label_smoothing=label_smoothing)
    term = ops.smart_mse(clean.float(), perturbed.float(), backend=backend)
    return loss + lam * term, loss, term, clean


# ---- full SMART --------------------------------------------------------------------------------------
def symmetric_divergence(task: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Symmetric divergence between two model outputs of `task`, mean over the batch:
    sst:   KL(P||Q) + KL(Q||P) of the softmax distributions = sum_k (P_k - Q_k)(log P_k - log Q_k);
    quora: the same for Bernoulli(sigmoid(logit)) = (sigmoid(a) - sigmoid(b)) * (a - b);
    sts:   squared error (the outputs are scores, not distributions)."""
    kind = task_named(task).kind
    p, q = p.float(), q.float()
    if kind == "classification":
        lp, lq = F.log_softmax(p, dim=-1), F.log_softmax(q, dim=-1)
        return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()
    if kind == "binary":
        return ((torch.sigmoid(p) - torch.sigmoid(q)) * (p - q)).mean()
    return ((p - q) ** 2).mean()  # regression


@contextlib.contextmanager
def dropout_off(model, enabled: bool = True):
    """Evaluation mode (no dropout anywhere) inside the block; the previous mode afterwards."""
    was = model.training
    if enabled:
        model.train(False)
    try:
        yield
    finally:
        model.train(was)


def _normalise_linf(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / (max |x| over the hidden dim + eps): per token L-infinity normalisation (mt-dnn)."""
    return x / (x.abs().amax(dim=-1, keepdim=True) + eps)


def adversarial_perturbation(model, task: str, E: torch.Tensor, mask: torch.Tensor,
                             target: torch.Tensor, *, sigma: float = 1e-5, eta: float = 1e-3,
                             steps: int = 1, epsilon: float | None = None, keep_dropout: bool = False,
                             generator: torch.Generator | None = None,
                             return_losses: bool = False):
    """The adversarial perturbation delta of the embedding output E (N, L, H), detached
    (every row, the stacked s1 / s2 rows of bi / both pair batches included).

    delta starts as N(0, sigma^2) (zero on padding); each of `steps` ascent steps takes the
    gradient g of D(f(E + delta), target) and moves delta to (delta + eta g) normalised per token
    in L-inf (mt-dnn), or, with `epsilon`, to delta + eta g / max|g| clipped to the L-inf
    epsilon-ball (the paper's projected ascent). With return_losses, also the inner losses
    [before step 1, after step 1, ..., after step K] (for tests and diagnostics)."""
    head = task_named(task).head
    E0 = E.detach()
    target = target.detach()
    noise = torch.randn(E0.shape, generator=generator, dtype=torch.float32, device="cpu")
    delta = (noise.to(E0.device, E0.dtype) * sigma)
    pad = None
    if mask is not None:
        pad = mask.to(E0.dtype).unsqueeze(-1)  # (N, L, 1)
        delta = delta * pad
    losses = []
    with dropout_off(model, not keep_dropout), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            out = model.heads_from_embeddings(head, E0 + delta, mask)
            inner = symmetric_divergence(task, out, target)
            (g,) = torch.autograd.grad(inner, delta)
            losses.append(float(inner.detach()))
            if not torch.isfinite(g).all():
                delta = delta.detach()
                break
            with torch.no_grad():
                if epsilon is None:
                    delta = _normalise_linf(delta + eta * g)
                else:
                    delta = (delta + eta * _normalise_linf(g)).clamp(-epsilon, epsilon)
                if pad is not None:
                    delta = delta * pad
            delta = delta.detach()
        if return_losses:
            with torch.no_grad():
                out = model.heads_from_embeddings(head, E0 + delta, mask)
                losses.append(float(symmetric_divergence(task, out, target)))
    return (delta, losses) if return_losses else delta


class EmaTeacher(WeightEma):
    """Mean teacher for the momentum Bregman proximal point: theta~ <- beta theta~ + (1 - beta) theta
    after every optimizer step (no warm-up); evaluated without dropout and without gradient."""

    def __init__(self, model, beta: float = 0.995):
        super().__init__(model, beta, warmup=False)

    @property
    def beta(self) -> float:
        return self.decay

    @torch.no_grad()
    def __call__(self, task: str, batch: dict) -> torch.Tensor:
        return task_forward(self.model, task, batch)


def smart_full_loss(model, task: str, batch: dict, *, sigma: float = 1e-5, eta: float = 1e-3,
                    steps: int = 1, lam: float = 1.0, epsilon: float | None = None,
                    keep_dropout: bool = False, seed: int = 0, teacher: EmaTeacher | None = None,
                    mu: float = 1.0, label_smoothing: float = 0.0):
    """(total, task loss, SMART term, clean output) of full SMART for one padded batch:
    total = loss + lam * adv (+ mu * D(clean, teacher output) with a teacher); the SMART term
    returned is the unweighted adversarial divergence adv."""
    spec = task_named(task)
    head = spec.head
    type_ids = batch.get("token_type_ids") if spec.is_pair else None
    mask = batch["attention_mask"]
    E = model.bert.embed(batch["input_ids"], type_ids)  # (N, L, H): N = B, 2B or 3B rows
    clean = model.heads_from_embeddings(head, E, mask)  # (B, ...)
    loss = task_loss(task, clean, batch["labels"], label_smoothing=label_smoothing)
    g = torch.Generator().manual_seed(int(seed))
    delta = adversarial_perturbation(model, task, E, mask, clean, sigma=sigma, eta=eta, steps=steps,
                                     epsilon=epsilon, keep_dropout=keep_dropout, generator=g)
    with dropout_off(model, not keep_dropout):
        adv = model.heads_from_embeddings(head, E + delta, mask)
    term = symmetric_divergence(task, adv, clean)
    total = loss + lam * term
    if teacher is not None:
        breg = symmetric_divergence(task, clean, teacher(task, batch))
        total = total + mu * breg
    return total, loss, term, clean


def check_mode(mode: str) -> None:
    if mode not in SMART_MODES:
        raise ValueError(f"unknown SMART mode {mode!r}; expected one of {', '.join(SMART_MODES)}")


__all__ = ["SMART_MODES", "step_seed", "task_forward", "smart_simple_loss", "check_mode",
           "symmetric_divergence", "adversarial_perturbation", "smart_full_loss", "EmaTeacher",
           "dropout_off"]
