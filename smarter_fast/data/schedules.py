"""Multi-task training schedules of "SMARTer BERT": which batches of which task, in what order.

An epoch is a deterministic list of steps `(task, indices)` (indices into that task's training
set), computed from (schedule, sizes, lengths, batch size, seed, epoch) alone, so a run can be
resumed at any step position: `Schedule.epoch_steps(e)[position:]`.

- baseline: every epoch, every training set in full: SST, then Quora, then STS, batch by batch.
- split1:   Quora is cut once (seeded) into N random disjoint parts that cover it; epoch e uses
            part e mod N (SST and STS in full every epoch).
- split2:   as split1, and STS is cut into N parts the same way.
- interleave=True alternates batches among the tasks (round robin, a task drops out when it has
  no batches left) instead of running one task after the other.

Task samplers (batch-level interleaving: every step draws one batch of one task; all training
data, no splits; an epoch has as many steps as the tasks have batches together):
- round-robin:  sst, quora, sts, sst, ... (small tasks are cycled: each task gets 1/3 of the steps);
- proportional: task t with probability p_t = N_t / sum N (alpha = 1);
- sqrt:         p_t proportional to N_t^0.5;
- annealed:     p_t proportional to N_t^alpha, alpha going linearly from 1 (first step of training)
                to 0.2 (last step of the last epoch; needs `epochs`).
A task whose batches run out within an epoch starts over with a fresh shuffle. The draws are
seeded by (seed, epoch), so every epoch is fixed by the seed.

Gradient surgery (`group_steps`): every step takes one batch of every task. The schedule decides
which examples a task uses in an epoch and their batch order (split parts, sampler streams), and
the epoch has ceil(steps / number of tasks) such groups, so it costs about what it costs without
surgery; a task whose batches run out starts over. With a sampler, `task_weights` gives each
task's loss weight T * p_t (round-robin: 1), so the sampler's mixture becomes a loss weighting.

Within a task the batches are length-bucketed (LengthBucketSampler, seeded by (seed, epoch)).
`resolve_split_parts("auto", ...)` = max(1, round(|Quora train| / |SST train|)) (half up), computed after --limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..tasks import QUORA, STS, TASK_NAMES
from .batching import LengthBucketSampler

# The registry's order; a task's place in it also seeds its batch shuffles (`task_batches`).
TASK_ORDER = TASK_NAMES
SAMPLERS = ("round-robin", "proportional", "sqrt", "annealed")
SCHEDULES = ("baseline", "split1", "split2") + SAMPLERS
SPLIT_TASKS = {"baseline": (), "split1": (QUORA.name,), "split2": (QUORA.name, STS.name),
               **{name: () for name in SAMPLERS}}
ANNEAL_FROM, ANNEAL_TO = 1.0, 0.2


def sampler_alpha(name: str, progress: float = 0.0) -> float:
    """Exponent alpha of p_t ~ N_t^alpha; progress in [0, 1] is the fraction of training done."""
    if name == "round-robin":
        return 0.0
    if name == "proportional":
        return 1.0
    if name == "sqrt":
        return 0.5
    if name == "annealed":
        progress = min(max(float(progress), 0.0), 1.0)
        return ANNEAL_FROM + (ANNEAL_TO - ANNEAL_FROM) * progress
    raise ValueError(f"{name!r} is not a sampler; expected one of {', '.join(SAMPLERS)}")


def task_probabilities(sizes: dict, alpha: float) -> dict:
    """p_t = N_t^alpha / sum_s N_s^alpha over the tasks with N_t > 0 (others get 0)."""
    w = {t: (float(sizes[t]) ** alpha if sizes.get(t, 0) > 0 else 0.0) for t in TASK_ORDER}
    z = sum(w.values())
    if z <= 0:
        raise ValueError("no task has training examples")
    return {t: v / z for t, v in w.items()}


def resolve_split_parts(value, n_sst: int, n_quora: int) -> int:
    """'auto' -> max(1, round(n_quora / n_sst)); an int (or digit string) >= 1 as is."""
    if value is None or value == "auto":
        if n_sst <= 0:
            return 1
        return max(1, int(math.floor(n_quora / n_sst + 0.5)))  # round half up
    n = int(value)
    if n < 1:
        raise ValueError(f"split parts must be >= 1 or 'auto', got {value!r}")
    return n


def split_indices(n: int, parts: int, seed: int) -> list[np.ndarray]:
    """n indices cut into `parts` random disjoint parts that cover range(n) (sizes differ by at
    most one); the same for the same (n, parts, seed)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    perm = np.random.default_rng([seed, 0x5EED, n]).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, parts)]


@dataclass
class Schedule:
    """The training schedule of a run. `lengths[task]` are the token lengths of that task's
    training examples (for length bucketing); its len is the task's size."""

    name: str
    lengths: dict[str, Sequence[int]]
    batch_size: int
    seed: int = 0
    parts: int = 1
    interleave: bool = False
    pool_batches: int = 50
    epochs: int = 1  # total epochs of training (the annealed sampler's horizon)
    _splits: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {', '.join(SCHEDULES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.parts < 1:
            raise ValueError(f"split parts must be >= 1, got {self.parts}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        self.lengths = {t: np.asarray(self.lengths.get(t, []), dtype=np.int64) for t in TASK_ORDER}
        for task in SPLIT_TASKS[self.name]:
            self._splits[task] = split_indices(len(self.lengths[task]), self.parts, self.seed)

    def examples_for(self, task: str, epoch: int) -> np.ndarray:
        """Indices of `task`'s training examples used in `epoch` (0-based), in index order."""
        if task in self._splits:
            return self._splits[task][epoch % self.parts]
        return np.arange(len(self.lengths[task]))

    @property
    def is_sampler(self) -> bool:
        return self.name in SAMPLERS

    def task_batches(self, task: str, epoch: int, cycle: int = 0) -> list[list[int]]:
        """Length-bucketed batches of the task's examples for this epoch (global indices);
        cycle k > 0: the k-th reshuffled repetition (for tasks that run out of batches)."""
        idx = self.examples_for(task, epoch)
        if len(idx) == 0:
            return []
        offset = TASK_ORDER.index(task)  # tasks get different shuffles in the same epoch
        sampler = LengthBucketSampler(self.lengths[task][idx], self.batch_size,
                                      pool_batches=self.pool_batches,
                                      seed=self.seed + 1000 * offset + 7_919_111 * cycle)
        sampler.set_epoch(epoch)
        return [idx[b].tolist() for b in sampler.batches()]

    def _stream(self, task: str, epoch: int):
        """The task's batches for this epoch, then reshuffled repetitions, without end."""
        cycle = 0
        while True:
            batches = self.task_batches(task, epoch, cycle)
            if not batches:
                return
            yield from batches
            cycle += 1

    def n_batches(self, epoch: int) -> dict:
        return {t: math.ceil(len(self.examples_for(t, epoch)) / self.batch_size) for t in TASK_ORDER}

    def task_probs(self, epoch: int, step: int = 0) -> dict:
        """The sampler's task probabilities at `step` of `epoch` (samplers only)."""
        n = sum(self.n_batches(epoch).values())
        total = max(1, self.epochs * n - 1)
        alpha = sampler_alpha(self.name, (epoch * n + step) / total)
        return task_probabilities({t: len(self.lengths[t]) for t in TASK_ORDER}, alpha)

    def _sampler_tasks(self, epoch: int) -> list[str]:
        """The task of each step of a sampler epoch."""
        n = sum(self.n_batches(epoch).values())
        present = [t for t in TASK_ORDER if len(self.lengths[t])]
        if self.name == "round-robin":
            return [present[i % len(present)] for i in range(n)]
        rng = np.random.default_rng([self.seed, epoch, 0x5A3F])
        u = rng.random(n)
        out = []
        for i in range(n):
            p = self.task_probs(epoch, i) if self.name == "annealed" or i == 0 else p
            c = np.cumsum([p[t] for t in TASK_ORDER])
            out.append(TASK_ORDER[min(int(np.searchsorted(c, u[i] * c[-1], side="right")), len(c) - 1)])
        return out

    def epoch_steps(self, epoch: int) -> list[tuple[str, list[int]]]:
        """All steps of `epoch` (0-based) in order: (task, indices into that task's train set)."""
        if self.is_sampler:
            key = ("steps", epoch)
            if key not in self._cache:
                streams = {t: self._stream(t, epoch) for t in TASK_ORDER}
                self._cache = {key: [(t, next(streams[t])) for t in self._sampler_tasks(epoch)]}
            return list(self._cache[key])
        per_task = [[(t, b) for b in self.task_batches(t, epoch)] for t in TASK_ORDER]
        if not self.interleave:
            return [step for steps in per_task for step in steps]
        out, i = [], 0
        while any(i < len(s) for s in per_task):
            out += [s[i] for s in per_task if i < len(s)]
            i += 1
        return out

    def epoch_counts(self, epoch: int) -> dict[str, int]:
        """Training examples per task in `epoch` (samplers: examples drawn, repeats counted)."""
        if self.is_sampler:
            out = {t: 0 for t in TASK_ORDER}
            for t, ix in self.epoch_steps(epoch):
                out[t] += len(ix)
            return out
        return {t: len(self.examples_for(t, epoch)) for t in TASK_ORDER}

    def group_steps(self, epoch: int) -> list[dict[str, list[int]]]:
        """Gradient-surgery steps: each a {task: indices} with one batch of every task that has
        data; ceil(len(epoch_steps) / tasks) of them (see the module docstring)."""
        present = [t for t in TASK_ORDER if len(self.examples_for(t, epoch))]
        if not present:
            return []
        if self.is_sampler:
            order = {t: [ix for tt, ix in self.epoch_steps(epoch) if tt == t] for t in present}
            n = math.ceil(sum(len(v) for v in order.values()) / len(present))
            streams = {t: iter(order[t]) for t in present}
            extra = {t: self._stream(t, epoch + 7_777_777) for t in present}  # after the sampled ones
            return [{t: next(streams[t], None) or next(extra[t]) for t in present} for _ in range(n)]
        n = math.ceil(sum(self.n_batches(epoch).values()) / len(present))
        streams = {t: self._stream(t, epoch) for t in present}
        return [{t: next(streams[t]) for t in present} for _ in range(n)]

    def task_weights(self, epoch: int, step: int = 0) -> dict[str, float]:
        """Loss weight of each task in a gradient-surgery step: T * p_t with a sampler
        (round-robin and the split schedules: 1 for every task)."""
        if not self.is_sampler or self.name == "round-robin":
            return {t: 1.0 for t in TASK_ORDER}
        n = sum(self.n_batches(epoch).values())
        k = sum(1 for t in TASK_ORDER if len(self.lengths[t]))
        p = self.task_probs(epoch, min(step * k, max(n - 1, 0)))
        return {t: k * p[t] for t in TASK_ORDER}

    def state_dict(self) -> dict:
        """What defines the schedule (to check on resume that it is the same one)."""
        return {"name": self.name, "batch_size": self.batch_size, "seed": self.seed,
                "parts": self.parts, "interleave": self.interleave,
                "pool_batches": self.pool_batches,
                "sizes": {t: int(len(v)) for t, v in self.lengths.items()},
                **({"epochs": self.epochs} if self.name == "annealed" else {})}


__all__ = ["Schedule", "SCHEDULES", "SAMPLERS", "TASK_ORDER", "resolve_split_parts", "split_indices",
           "sampler_alpha", "task_probabilities"]
