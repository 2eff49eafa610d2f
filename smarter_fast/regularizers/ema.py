"""Exponential moving average of the weights (`python -m smarter_fast.train --ema DECAY`).

After every optimizer step: ema <- d * ema + (1 - d) * weights with d = min(DECAY, (1 + n) / (10 + n))
after n updates (the warm-up of tf.train.ExponentialMovingAverage, so the first steps are not
dominated by the pretrained weights). Dev evaluation, `checkpoints/best` and the predictions use the
averaged weights; training goes on from the raw ones. The average and its update count are part of
the training checkpoint (`state_dict`), so --resume keeps it.
Cost: one in-place lerp over the parameters per step (three streams of 4 bytes per parameter).
"""

from __future__ import annotations

import copy

import torch


class WeightEma:
    """A frozen eval-mode copy of `model` whose weights follow the moving average. warmup=False
    uses DECAY from the first update (the Bregman teacher of full SMART, smarter_fast.regularizers.smart)."""

    def __init__(self, model, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None

    def rate(self) -> float:
        """The decay of the next update."""
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model) -> None:
        d = self.rate()
        self.updates += 1
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """The average and its update count; the decay stays this run's (its option)."""
        self.updates = int(sd["updates"])
        self.model.load_state_dict(sd["weights"])
