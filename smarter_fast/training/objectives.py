"""The loss of one batch under a run's regulariser: the one place a configuration's loss is built.

An objective is called as `objective(model, task, batch, global_step)` and returns
`(total, task loss, SMART term or None)`; `total` is what is differentiated. Kinds:
- `Plain`: the task's loss (cross-entropy, BCE or MSE; smarter_fast.tasks);
- `SmartSimple`: the report's Algorithm 1 (noise on the embedding output; smarter_fast.regularizers.smart);
- `SmartFull`: adversarial SMART, with the Bregman teacher when one is given.
To add a kind: a class with that call signature, and a branch in `build_objective`.
"""

from __future__ import annotations

from ..regularizers.smart import smart_full_loss, smart_simple_loss, step_seed, task_forward
from ..tasks import task_loss


class Plain:
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model, task, batch, global_step):
        loss = task_loss(task, task_forward(model, task, batch), batch["labels"],
                         label_smoothing=self.label_smoothing)
        return loss, loss, None


class SmartSimple:
    def __init__(self, sigma: float, lam: float, seed: int, backend: str = "auto",
                 label_smoothing: float = 0.0):
        self.sigma, self.lam, self.seed, self.backend = sigma, lam, seed, backend
        self.label_smoothing = label_smoothing

    def __call__(self, model, task, batch, global_step):
        total, loss, term, _ = smart_simple_loss(model, task, batch, self.sigma, self.lam,
                                                 step_seed(self.seed, global_step), backend=self.backend,
                                                 label_smoothing=self.label_smoothing)
        return total, loss, term


class SmartFull:
    def __init__(self, *, sigma, eta, steps, lam, epsilon, keep_dropout, mu, seed, teacher=None,
                 label_smoothing: float = 0.0):
        self.options = dict(sigma=sigma, eta=eta, steps=steps, lam=lam, epsilon=epsilon,
                            keep_dropout=keep_dropout, mu=mu, label_smoothing=label_smoothing)
        self.seed, self.teacher = seed, teacher

    def __call__(self, model, task, batch, global_step):
        total, loss, term, _ = smart_full_loss(model, task, batch, seed=step_seed(self.seed, global_step),
                                               teacher=self.teacher, **self.options)
        return total, loss, term


def build_objective(config, teacher=None):
    """The objective of a TrainConfig (`teacher`: the Bregman EMA teacher of --smart-full-bregman)."""
    c = config
    if c.smart == "simple":
        return SmartSimple(c.smart_sigma, c.smart_lambda, c.seed, c.backend, c.label_smoothing)
    if c.smart == "full":
        return SmartFull(sigma=c.smart_full_sigma, eta=c.smart_full_eta, steps=c.smart_full_steps,
                         lam=c.smart_full_lambda, epsilon=c.smart_full_epsilon,
                         keep_dropout=c.smart_full_keep_dropout, mu=c.smart_full_mu, seed=c.seed,
                         teacher=teacher, label_smoothing=c.label_smoothing)
    if c.smart == "off":
        return Plain(c.label_smoothing)
    raise ValueError(f"unknown SMART mode {c.smart!r}")


__all__ = ["Plain", "SmartFull", "SmartSimple", "build_objective"]
