"""Task losses of "SMARTer BERT": one function per task, all means over the batch.

- sst   (5-way sentiment):   cross-entropy on the (B, 5) logits, integer labels 0-4;
- quora (paraphrase, 0/1):   binary cross-entropy with logits on the (B,) logits;
- sts   (similarity, 0-5):   mean squared error of the (B,) raw scores against the 0-5 gold scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("sst", "quora", "sts")
# Task names of the model heads (smarter_fast.model.heads) for our short task names.
HEAD_OF = {"sst": "sentiment", "quora": "paraphrase", "sts": "similarity"}


def sst_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the 5 SST classes: logits (B, 5), labels (B,) int64 in 0-4; with
    `label_smoothing` e the target is (1 - e) on the gold class plus e / 5 on every class."""
    return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)


def quora_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits: logits (B,), labels (B,) 0/1."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def sts_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the 0-5 scale: scores (B,), labels (B,) floats in [0, 5]."""
    return F.mse_loss(scores.float(), labels.float())


LOSSES = {"sst": sst_loss, "quora": quora_loss, "sts": sts_loss}


def task_loss(task: str, output: torch.Tensor, labels: torch.Tensor, *,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of `task` ('sst', 'quora' or 'sts') for the model output and gold labels.
    `label_smoothing` applies to the SST cross-entropy only (the 5 sentiment classes are graded
    and neighbours are often confused by annotators)."""
    try:
        fn = LOSSES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None
    if task == "sst" and label_smoothing:
        return fn(output, labels, label_smoothing)
    return fn(output, labels)


__all__ = ["TASKS", "HEAD_OF", "LOSSES", "task_loss", "sst_loss", "quora_loss", "sts_loss"]
