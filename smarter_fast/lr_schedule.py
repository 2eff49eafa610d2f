"""Learning-rate schedules and layer-wise learning-rate decay.

    factor(step) = step / warmup                         for step < warmup (linear warm-up)
                 = 1                                     constant
                 = (total - step) / (total - warmup)     linear decay to 0
                 = 0.5 (1 + cos(pi (step - warmup) / (total - warmup)))   cosine decay to 0

`step` is the global optimizer step (0-based: the lr used by the step about to be taken), so the
schedule is a pure function of the step count and a resumed run continues it exactly.

Layer-wise decay (`param_groups(model, lr, layer_decay)`): the heads and the pooler get `lr`,
encoder layer i (0-based, of n) gets lr * decay^(n - i), the embeddings lr * decay^(n + 1).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "constant") -> float:
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)  # never 0: the first step moves
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    frac = min(max((step - warmup) / span, 0.0), 1.0)
    if kind == "linear":
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def warmup_steps(total: int, ratio: float = 0.0, steps: int | None = None) -> int:
    """--warmup-steps if given, else round(ratio * total)."""
    if steps is not None:
        return max(0, int(steps))
    return max(0, int(round(float(ratio) * total)))


def layer_depths(model) -> dict[str, int]:
    """Depth of every named parameter of a MultitaskBert: embeddings 0, layer i -> i + 1,
    pooler and heads n + 1 (n encoder layers)."""
    n = len(model.bert.layers)
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith("bert.embeddings."):
            out[name] = 0
        elif name.startswith("bert.layers."):
            out[name] = int(name.split(".")[2]) + 1
        else:
            out[name] = n + 1
    return out


def param_groups(model, lr: float, layer_decay: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups, one per depth, lr * layer_decay^(n + 1 - depth); every group
    keeps its `base_lr` for the schedule. layer_decay 1: one group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if layer_decay == 1.0:
        return [{"params": params, "lr": lr, "base_lr": lr, "weight_decay": weight_decay}]
    depths = layer_depths(model)
    top = max(depths.values())
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(depths[name], []).append(p)
    out = []
    for d in sorted(groups):
        g_lr = lr * layer_decay ** (top - d)
        out.append({"params": groups[d], "lr": g_lr, "base_lr": g_lr, "weight_decay": weight_decay,
                    "depth": d})
    return out


class LRSchedule:
    """Sets every group's lr to base_lr * factor(step) before each optimizer step."""

    def __init__(self, optimizer, total_steps: int, warmup: int = 0, kind: str = "constant"):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(LR_SCHEDULES)}")
        self.optimizer, self.total, self.warmup, self.kind = optimizer, int(total_steps), int(warmup), kind
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])

    def factor(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind)

    def apply(self, step: int) -> float:
        """Set the lrs for global step `step`; returns the factor."""
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f


__all__ = ["LR_SCHEDULES", "lr_factor", "warmup_steps", "layer_depths", "param_groups", "LRSchedule"]
