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

Within a task the batches are length-bucketed (LengthBucketSampler, seeded by (seed, epoch)).
`resolve_split_parts("auto", ...)` = max(1, round(|Quora train| / |SST train|)) (half up), computed after --limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .batching import LengthBucketSampler

TASK_ORDER = ("sst", "quora", "sts")
SCHEDULES = ("baseline", "split1", "split2")
SPLIT_TASKS = {"baseline": (), "split1": ("quora",), "split2": ("quora", "sts")}


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
    _splits: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {', '.join(SCHEDULES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.parts < 1:
            raise ValueError(f"split parts must be >= 1, got {self.parts}")
        self.lengths = {t: np.asarray(self.lengths.get(t, []), dtype=np.int64) for t in TASK_ORDER}
        for task in SPLIT_TASKS[self.name]:
            self._splits[task] = split_indices(len(self.lengths[task]), self.parts, self.seed)

    def examples_for(self, task: str, epoch: int) -> np.ndarray:
        """Indices of `task`'s training examples used in `epoch` (0-based), in index order."""
        if task in self._splits:
            return self._splits[task][epoch % self.parts]
        return np.arange(len(self.lengths[task]))

    def task_batches(self, task: str, epoch: int) -> list[list[int]]:
        """Length-bucketed batches of the task's examples for this epoch (global indices)."""
        idx = self.examples_for(task, epoch)
        if len(idx) == 0:
            return []
        offset = TASK_ORDER.index(task)  # tasks get different shuffles in the same epoch
        sampler = LengthBucketSampler(self.lengths[task][idx], self.batch_size,
                                      pool_batches=self.pool_batches, seed=self.seed + 1000 * offset)
        sampler.set_epoch(epoch)
        return [idx[b].tolist() for b in sampler.batches()]

    def epoch_steps(self, epoch: int) -> list[tuple[str, list[int]]]:
        """All steps of `epoch` (0-based) in order: (task, indices into that task's train set)."""
        per_task = [[(t, b) for b in self.task_batches(t, epoch)] for t in TASK_ORDER]
        if not self.interleave:
            return [step for steps in per_task for step in steps]
        out, i = [], 0
        while any(i < len(s) for s in per_task):
            out += [s[i] for s in per_task if i < len(s)]
            i += 1
        return out

    def epoch_counts(self, epoch: int) -> dict[str, int]:
        """Training examples per task in `epoch`."""
        return {t: len(self.examples_for(t, epoch)) for t in TASK_ORDER}

    def state_dict(self) -> dict:
        """What defines the schedule (to check on resume that it is the same one)."""
        return {"name": self.name, "batch_size": self.batch_size, "seed": self.seed,
                "parts": self.parts, "interleave": self.interleave,
                "pool_batches": self.pool_batches,
                "sizes": {t: int(len(v)) for t, v in self.lengths.items()}}


__all__ = ["Schedule", "SCHEDULES", "TASK_ORDER", "resolve_split_parts", "split_indices"]
