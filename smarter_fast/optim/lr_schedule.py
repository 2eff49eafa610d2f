"""Learning-rate schedules and layer-wise learning-rate decay.

    factor(step) = step / warmup                         for step < warmup (linear warm-up)
                 = 1                                     constant
                 = (total - step) / (total - warmup)     linear decay to 0
                 = 0.5 (1 + cos(pi (step - warmup) / (total - warmup)))   cosine decay to 0

`step` is the global optimizer step (0-based: the lr used by the step about to be taken), so the
schedule is a pure function of the step count and a resumed run continues it exactly.

Under a time budget (`--time-budget`) the number of steps is not known in advance: the schedule
then runs on `progress`, the fraction of the budget spent (or of the steps, when --epochs ends
training first), and a warm-up ratio is a fraction of the budget (`lr_factor_at`).

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


def lr_factor_at(progress: float, warmup_fraction: float = 0.0, kind: str = "constant") -> float:
    """Factor at `progress` (fraction of training done, in [0, 1]) with a warm-up over the first
    `warmup_fraction` of it; the time-budget counterpart of lr_factor."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(LR_SCHEDULES)}")
    progress = min(max(progress, 0.0), 1.0)
    if warmup_fraction > 0 and progress < warmup_fraction:
        return max(progress / warmup_fraction, 0.01)  # never 0: the first step moves
    if kind == "constant":
        return 1.0
    frac = (progress - warmup_fraction) / max(1e-12, 1.0 - warmup_fraction)
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

    def __init__(self, optimizer, total_steps: int | None, warmup: int = 0, kind: str = "constant",
                 warmup_fraction: float = 0.0):
        """total_steps None: a time-budget run, driven by `progress` alone. warmup (steps) and
        warmup_fraction (of progress, for time-budget runs) are alternatives."""
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(LR_SCHEDULES)}")
        self.optimizer, self.kind = optimizer, kind
        self.total = None if total_steps is None else int(total_steps)
        self.warmup, self.warmup_fraction = int(warmup), float(warmup_fraction)
        self.last_factor = None  # the factor of the last apply()
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])

    def factor(self, step: int, progress: float | None = None) -> float:
        """Step-driven; or, given the time-budget `progress`, driven by the larger of progress and
        step / total_steps (whichever end comes first)."""
        if progress is None:
            if self.total is None:
                raise ValueError("a time-budget schedule (total_steps None) needs progress")
            return lr_factor(step, self.total, self.warmup, self.kind)
        if self.total:
            progress = max(progress, step / self.total)
        if self.warmup and step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return lr_factor_at(progress, self.warmup_fraction, self.kind)

    def apply(self, step: int, progress: float | None = None) -> float:
        """Set the lrs for global step `step` (and time-budget progress); returns the factor."""
        f = self.last_factor = self.factor(step, progress)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return f

    def state_dict(self) -> dict:
        """The factor in effect (the schedule itself is a function of the step and the options)."""
        return {"last_factor": self.last_factor}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("last_factor") is not None:
            self.last_factor = float(sd["last_factor"])
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * self.last_factor


__all__ = ["LR_SCHEDULES", "lr_factor", "lr_factor_at", "warmup_steps", "layer_depths", "param_groups", "LRSchedule"]
