"""SMART regularisation, the simple form of "SMARTer BERT" (the report's Algorithm 1).

    E      = model.bert.embed(input_ids, token_type_ids)        # once
    E'     = E + sigma * N(0, 1)                                  # ops.smart_noise, seeded
    clean  = heads(task, E),  perturbed = heads(task, E')         # the same encoder and head
    loss   = task_loss(clean, y) + lambda * mean((clean - perturbed)^2)   # ops.smart_mse

Gradients flow through both branches (and through the noise, whose gradient is the identity, back
into the shared embeddings). The model outputs compared are the raw task outputs: SST logits (B, 5),
Quora logits (B,), STS scores (B,).

The full (adversarial) SMART of the paper (power iteration for the worst perturbation, Bregman
proximal point) is `--smart full`, planned for a later issue.
"""

from __future__ import annotations

import torch

from . import ops
from .losses import HEAD_OF, task_loss

SMART_MODES = ("off", "simple", "full")


def step_seed(run_seed: int, step: int) -> int:
    """Noise seed for a global training step: different every step, fixed by the run seed."""
    return (int(run_seed) * 1_000_003 + int(step) * 7919 + 12345) % (2 ** 31 - 1)


def task_forward(model, task: str, batch: dict) -> torch.Tensor:
    """Plain forward of a padded batch for task 'sst' | 'quora' | 'sts'."""
    type_ids = batch.get("token_type_ids") if task != "sst" else None
    return model(HEAD_OF[task], batch["input_ids"], batch["attention_mask"], type_ids)


def smart_simple_loss(model, task: str, batch: dict, sigma: float, lam: float, seed: int,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, task loss, SMART term, clean output) for one padded batch.

    total = task loss + lam * smart_mse(clean, perturbed); the SMART term returned is the
    unweighted mean squared difference.
    """
    head = HEAD_OF[task]
    type_ids = batch.get("token_type_ids") if task != "sst" else None
    mask = batch["attention_mask"]
    E = model.bert.embed(batch["input_ids"], type_ids)  # (B, L, H), computed once
    clean = model.heads_from_embeddings(head, E, mask)
    E_noisy = ops.smart_noise(E, sigma, seed, backend=backend)
    perturbed = model.heads_from_embeddings(head, E_noisy, mask)
    loss = task_loss(task, clean, batch["labels"])
    term = ops.smart_mse(clean.float(), perturbed.float(), backend=backend)
    return loss + lam * term, loss, term, clean


class SmartNotImplemented(NotImplementedError):
    pass


def check_mode(mode: str) -> None:
    if mode not in SMART_MODES:
        raise ValueError(f"unknown SMART mode {mode!r}; expected one of {', '.join(SMART_MODES)}")
    if mode == "full":
        raise SmartNotImplemented("--smart full (adversarial SMART with Bregman proximal point) is "
                                  "not implemented yet; it comes in a later issue. Use --smart simple.")


__all__ = ["SMART_MODES", "step_seed", "task_forward", "smart_simple_loss", "check_mode",
           "SmartNotImplemented"]
