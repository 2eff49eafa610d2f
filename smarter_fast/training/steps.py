"""Step shapes and the optimizer step: what one training step does.

A step shape turns one item of an epoch's step list into gradients (forward and backward) and
says what it trained:
- `BatchSteps`: items are (task, padded batch) already made (the benchmarks' steps);
- `SingleTaskSteps`: items are (task, example indices) of `Schedule.epoch_steps`: one task's
  batch per step, this rank's shard of the global batch under torchrun;
- `SurgerySteps`: items are {task: indices} of `Schedule.group_steps`: one batch of every task,
  each task's encoder gradient collected apart and combined by PCGrad / GradVac.
`TrainStep` is one whole optimizer step around a shape: gradients, the non-finite check (agreed
over ranks, with the stop request and the epoch's time), the LR schedule, `optimizer.step()`,
the weight averages, `zero_grad`. The Trainer's loop and the benchmarks both call it.

To add a step shape: a class with `epoch_items(epoch)`, `run(item, global_step) -> StepResult`,
`where(item)`, `examples(item)`, and optionally `applied(totals)` / `extra_stats(totals)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import distributed
from ..model.grad_sinks import attach_grad_sinks
from ..tasks import task as task_named

PAIR_SWAP_SALT = 7_211


def pair_swaps(seed: int, global_step: int, n: int, stream: int | None = None):
    """--pair-order symmetric: which of the n pairs of a batch are fed as (s2, s1), half at random;
    a function of (seed, step[, stream]), so a resumed run draws the same. A gradient-surgery
    step draws one independent stream per task (`stream`: the task's index)."""
    # stream + 1: numpy's SeedSequence gives [..., 0] the same numbers as [...]
    key = [seed, PAIR_SWAP_SALT, global_step] + ([] if stream is None else [stream + 1])
    return np.random.default_rng(key).random(n) < 0.5


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class StepResult:
    checks: list = field(default_factory=list)  # loss tensors checked for NaN/inf
    values: dict = field(default_factory=dict)  # task -> (task loss, examples, SMART term or None)
    examples: int = 0  # examples of the global batch (progress)


class BatchSteps:
    """One task's ready-made batch per step. `forward(fn)` runs fn(model) (through DDP when
    distributed); `autocast` is the bf16 autocast switch."""

    def __init__(self, model, objective, device, autocast: bool = False, forward=None):
        self.model, self.objective, self.device, self.autocast = model, objective, torch.device(device), autocast
        self.forward = forward or (lambda fn: fn(model))

    def train_batch(self, task, batch, global_step, weight: float = 1.0, n: int | None = None) -> StepResult:
        def compute(m):
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return self.objective(m, task, batch, global_step)

        total, loss, term = self.forward(compute)
        (total * weight if weight != 1.0 else total).backward()
        n = len(batch["labels"]) if n is None else n
        return StepResult([loss.detach(), total.detach()],
                          {task: (loss.detach(), n if weight > 0 else 0, None if term is None else term.detach())},
                          n)

    def run(self, item, global_step) -> StepResult:
        task, batch = item
        return self.train_batch(task, batch, global_step)

    def where(self, item) -> str:
        return item[0]

    def examples(self, item) -> int:
        """Examples the item trains (over all ranks), for progress."""
        return len(item[1]["labels"])

    def applied(self, totals) -> None:
        pass

    def extra_stats(self, totals) -> dict:
        return {}


class SingleTaskSteps(BatchSteps):
    """The schedule's steps of one task each; under torchrun each rank trains its shard of the
    global batch, with the pair orders drawn for the whole global batch."""

    def __init__(self, model, objective, device, schedule, data, seed, symmetric, autocast=False, forward=None):
        super().__init__(model, objective, device, autocast, forward)
        self.schedule, self.data, self.seed, self.symmetric = schedule, data, seed, symmetric

    def epoch_items(self, epoch):
        return self.schedule.epoch_steps(epoch)

    def examples(self, item) -> int:
        return len(item[1])

    def run(self, item, global_step) -> StepResult:
        task, global_indices = item
        part, weight = distributed.shard(range(len(global_indices)))
        indices = [global_indices[i] for i in part]
        swaps = (pair_swaps(self.seed, global_step, len(global_indices))
                 if self.symmetric and task_named(task).is_pair else None)
        batch = to_device(self.data[task].batch(indices, swap=None if swaps is None else swaps[part]), self.device)
        result = self.train_batch(task, batch, global_step, weight, n=len(indices))
        result.examples = len(global_indices)
        return result


class SurgerySteps(BatchSteps):
    """One batch of every task per step (one process); gradients combined by `surgery`."""

    def __init__(self, model, objective, device, schedule, data, seed, symmetric, surgery, autocast=False):
        super().__init__(model, objective, device, autocast)
        self.schedule, self.data, self.seed, self.symmetric = schedule, data, seed, symmetric
        self.surgery = surgery

    def epoch_items(self, epoch):
        groups = self.schedule.group_steps(epoch)
        return [(g, self.schedule.task_weights(epoch, i)) for i, g in enumerate(groups)]

    def run(self, item, global_step) -> StepResult:
        group, weights = item
        out = StepResult()
        for task, indices in group.items():
            swaps = (pair_swaps(self.seed, global_step, len(indices), stream=self.surgery.tasks.index(task))
                     if self.symmetric and task_named(task).is_pair else None)
            batch = to_device(self.data[task].batch(indices, swap=swaps), self.device)
            r = self.train_batch(task, batch, global_step, weights[task], n=len(indices))
            self.surgery.collect(task)  # one task's graph at a time
            out.checks += r.checks
            out.values.update(r.values)
            out.examples += r.examples
        # a non-finite row gives a non-finite combination (and leaves GradVac alone)
        self.surgery.combine(list(group))
        return out

    def where(self, item) -> str:
        return self.surgery.method

    def examples(self, item) -> int:
        return sum(len(ix) for ix in item[0].values())

    def applied(self, totals) -> None:
        c = self.surgery.last_cosines
        if c is not None and c.shape[0] > 1:
            totals.cos_sum += float(c[~torch.eye(c.shape[0], dtype=torch.bool)].mean())
            totals.cos_n += 1

    def extra_stats(self, totals) -> dict:
        return {"grad_surgery": self.surgery.method,
                "task_grad_cosine": totals.cos_sum / totals.cos_n if totals.cos_n else None}


class TrainStep:
    """One optimizer step around a step shape. `guard`: a NonFiniteGuard (None: no check);
    `lr`: an LRSchedule or None; `averages`: weight averages updated after each applied step
    (the SMART teacher, --ema); `stop`: the StopRequest whose flag is agreed over ranks."""

    def __init__(self, model, optimizer, shape, guard=None, lr=None, averages=(), stop=None, device="cpu"):
        self.model, self.optimizer, self.shape = model, optimizer, shape
        # the encoder writes its gradients into the optimizer's memory (DDP: the inner module)
        self.grad_sinks = attach_grad_sinks(getattr(model, "module", model), optimizer)
        self.guard, self.lr, self.averages, self.stop = guard, lr, list(averages), stop
        self.device = device
        self.stop_now, self.agreed_seconds = False, 0.0

    def __call__(self, item, global_step: int, where: str = "", seconds=None,
                 progress_of=None) -> tuple[bool, StepResult]:
        """(skipped, what was trained). seconds(): the epoch's training time so far, read after
        the backward; progress_of(seconds): the fraction of a time budget spent after that
        much of this epoch (None without one), for the LR schedule."""
        result = self.shape.run(item, global_step)
        skip = self._check(result.checks, where, seconds() if seconds is not None else 0.0)
        if not skip:
            if self.lr is not None:
                self.lr.apply(global_step, progress_of(self.agreed_seconds) if progress_of else None)
            self.optimizer.step()
            for average in self.averages:
                average.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return skip, result

    def _check(self, checks, where, seconds) -> bool:
        """True when the step must be skipped (non-finite on any rank); also agrees on a stop
        request and on the epoch's time so far (the slowest rank's), in one all-reduce."""
        if self.guard is None:
            return False
        bad = self.guard.bad(checks, self.model.parameters())
        stop = float(self.stop.requested) if self.stop is not None else 0.0
        bad_any, stop_any, self.agreed_seconds = distributed.all_reduce_max(
            [float(bad), stop, float(seconds)], self.device)
        self.stop_now = stop_any > 0
        return self.guard.record(bad_any > 0, where)


__all__ = ["BatchSteps", "PAIR_SWAP_SALT", "SingleTaskSteps", "StepResult", "SurgerySteps", "TrainStep",
           "pair_swaps", "to_device"]

