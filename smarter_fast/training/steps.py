"""Step shapes and the optimizer step: what one training step does.

A step shape turns one item of an epoch's step list into gradients (forward and backward) and
says what it trained:
- `BatchSteps`: items are (task, padded batch) already made (the benchmarks' steps);
- `SingleTaskSteps`: items are (task, example indices) of `Schedule.epoch_steps`: one task's
  batch per step, this rank's shard of the global batch under torchrun;
- `SurgerySteps`: items are {task: indices} of `Schedule.group_steps`: one batch of every task,
  each task's encoder gradient collected apart and combined by PCGrad / GradVac.
With --grad-accum-steps K the schedule's batches are K times --batch-size and these two shapes
run each (each rank's share of it) as micro-batches of at most --batch-size, every micro-batch
loss weighted by its share of the examples: the gradient is the large batch's mean, the last
micro-batch may be smaller.
`TrainStep` is one whole optimizer step around a shape: gradients, the non-finite check (agreed
over ranks, with the stop request and the epoch's time), gradient clipping, the LR schedule,
`optimizer.step()`, the weight averages, `zero_grad`. The Trainer's loop and the benchmarks both
call it.

To add a step shape: a class with `epoch_items(epoch)`, `run(item, global_step) -> StepResult`,
`where(item)`, `examples(item)`, and optionally `applied(totals)` / `extra_stats(totals)`.
"""

from __future__ import annotations

import contextlib
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


def micro_batches(positions: list, size: int | None) -> list[list]:
    """`positions` in consecutive chunks of at most `size` (None: one chunk)."""
    if size is None or len(positions) <= size:
        return [positions]
    return [positions[i:i + size] for i in range(0, len(positions), size)]


def merge_results(parts: list, task: str, examples: int) -> "StepResult":
    """One task's micro-batch results as one: losses and SMART terms averaged by examples."""
    n = sum(r.values[task][1] for r in parts)
    weights = [r.values[task][1] / n if n else 1.0 / len(parts) for r in parts]
    loss = sum(w * r.values[task][0] for w, r in zip(weights, parts))
    terms = [r.values[task][2] for r in parts]
    term = None if terms[0] is None else sum(w * t for w, t in zip(weights, terms))
    return StepResult([c for r in parts for c in r.checks], {task: (loss, n, term)}, examples)


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

    def __init__(self, model, objective, device, schedule, data, seed, symmetric, autocast=False, forward=None,
                 micro_batch: int | None = None):
        super().__init__(model, objective, device, autocast, forward)
        self.schedule, self.data, self.seed, self.symmetric = schedule, data, seed, symmetric
        self.micro_batch = micro_batch  # --grad-accum-steps: examples per forward (None: all)

    def epoch_items(self, epoch):
        return self.schedule.epoch_steps(epoch)

    def examples(self, item) -> int:
        return len(item[1])

    def run(self, item, global_step) -> StepResult:
        task, global_indices = item
        part, weight = distributed.shard(range(len(global_indices)))
        swaps = (pair_swaps(self.seed, global_step, len(global_indices))
                 if self.symmetric and task_named(task).is_pair else None)
        chunks = micro_batches(part, self.micro_batch)
        results = []
        for i, chunk in enumerate(chunks):
            indices = [global_indices[j] for j in chunk]
            batch = to_device(self.data[task].batch(indices, swap=None if swaps is None else swaps[chunk]),
                              self.device)
            share = weight * len(chunk) / len(part) if len(chunks) > 1 else weight
            with self._no_sync(i < len(chunks) - 1):  # DDP: all-reduce once, after the last
                results.append(self.train_batch(task, batch, global_step, share, n=len(indices)))
        result = results[0] if len(results) == 1 else merge_results(results, task, len(global_indices))
        result.examples = len(global_indices)
        return result

    def _no_sync(self, skip: bool):
        no_sync = getattr(self.forward, "no_sync", None)
        return no_sync() if skip and no_sync is not None else contextlib.nullcontext()


class SurgerySteps(BatchSteps):
    """One batch of every task per step (one process); gradients combined by `surgery`."""

    def __init__(self, model, objective, device, schedule, data, seed, symmetric, surgery, autocast=False,
                 micro_batch: int | None = None):
        super().__init__(model, objective, device, autocast)
        self.schedule, self.data, self.seed, self.symmetric = schedule, data, seed, symmetric
        self.surgery, self.micro_batch = surgery, micro_batch

    def epoch_items(self, epoch):
        groups = self.schedule.group_steps(epoch)
        return [(g, self.schedule.task_weights(epoch, i)) for i, g in enumerate(groups)]

    def run(self, item, global_step) -> StepResult:
        group, weights = item
        out = StepResult()
        for task, indices in group.items():
            swaps = (pair_swaps(self.seed, global_step, len(indices), stream=self.surgery.tasks.index(task))
                     if self.symmetric and task_named(task).is_pair else None)
            chunks = micro_batches(list(range(len(indices))), self.micro_batch)
            parts = []
            for chunk in chunks:
                batch = to_device(self.data[task].batch([indices[j] for j in chunk],
                                                        swap=None if swaps is None else swaps[chunk]), self.device)
                share = weights[task] * len(chunk) / len(indices) if len(chunks) > 1 else weights[task]
                parts.append(self.train_batch(task, batch, global_step, share, n=len(chunk)))
            r = parts[0] if len(parts) == 1 else merge_results(parts, task, len(indices))
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

    def __init__(self, model, optimizer, shape, guard=None, lr=None, averages=(), stop=None, device="cpu",
                 max_grad_norm: float | None = None, need_grad_norm: bool = False):
        self.model, self.optimizer, self.shape = model, optimizer, shape
        # the encoder writes its gradients into the optimizer's memory (DDP: the inner module)
        self.grad_sinks = attach_grad_sinks(getattr(model, "module", model), optimizer)
        self.guard, self.lr, self.averages, self.stop = guard, lr, list(averages), stop
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.need_grad_norm = need_grad_norm or max_grad_norm is not None
        self.grad_norm = None  # the global gradient L2 norm of the last step, before clipping
        self.stop_now, self.agreed_seconds = False, 0.0

    def __call__(self, item, global_step: int, where: str = "", seconds=None,
                 progress_of=None) -> tuple[bool, StepResult]:
        """(skipped, what was trained). seconds(): the epoch's training time so far, read after
        the backward; progress_of(seconds): the fraction of a time budget spent after that
        much of this epoch (None without one), for the LR schedule."""
        result = self.shape.run(item, global_step)
        skip = self._check(result.checks, where, seconds() if seconds is not None else 0.0)
        if self.need_grad_norm:  # the guard has already read it; else read the gradients once
            self.grad_norm = self.guard.grad_norm if self.guard is not None else _global_norm(self._grads())
        if not skip:
            if self.max_grad_norm is not None:
                clip_(self._grads(), self.grad_norm, self.max_grad_norm)
            if self.lr is not None:
                self.lr.apply(global_step, progress_of(self.agreed_seconds) if progress_of else None)
            self.optimizer.step()
            for average in self.averages:
                average.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return skip, result

    def _grads(self) -> list:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

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


def _global_norm(grads) -> float | None:
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))


@torch.no_grad()
def clip_(grads, norm: float | None, max_norm: float) -> None:
    """Scale the gradients in place to global norm `max_norm` when `norm` is larger (the
    coefficient of torch.nn.utils.clip_grad_norm_). The encoder's gradients may live in the
    optimizer's flat buffer (grad sinks): scaling the views scales what the optimizer reads."""
    if not grads or norm is None:
        return
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)


__all__ = ["BatchSteps", "PAIR_SWAP_SALT", "SingleTaskSteps", "StepResult", "SurgerySteps", "TrainStep",
           "clip_", "merge_results", "micro_batches", "pair_swaps", "to_device"]

