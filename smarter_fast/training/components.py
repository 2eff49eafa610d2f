"""The Trainer's stateful components that are not the model, the optimizer or a regulariser.

Each has `state_dict()` / `load_state_dict()`, so the Checkpointer saves and resumes it without
knowing what it is:
- `Progress`: where training is (epochs done, next step in the epoch, global step);
- `RunRecord`: the metrics rows so far and the best score;
- `EpochTotals` (per rank): the partial sums of the epoch in progress (losses, examples);
- `RngState` (per rank): the python, numpy and torch (and CUDA) generators;
- `NonFiniteGuard`: skipped steps, in a row and in all;
- `ScheduleIdentity`: what defines the data order, checked on resume (the order itself is a pure
  function of the seed and the epoch, smarter_fast.data.schedules).
Also the time budget (`TrainingClock`) and the stop request on SIGINT/SIGTERM (`StopRequest`).
"""

from __future__ import annotations

import base64
import logging
import math
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from . import distributed

log = logging.getLogger("smarter_fast")


# ---- position and record ------------------------------------------------------------------------
class Progress:
    """epoch: the epoch being trained (0-based; with position 0, the next one to start);
    position: index of the next step in that epoch's step list; global_step: optimizer steps
    taken or skipped since the start of training."""

    def __init__(self):
        self.epoch, self.position, self.global_step = 0, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "global_step": self.global_step}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position, self.global_step = int(sd["epoch"]), int(sd["position"]), int(sd["global_step"])


class RunRecord:
    """The metrics rows written so far (one per evaluation) and the best mean score."""

    def __init__(self):
        self.rows: list[dict] = []
        self.best = {"mean_score": -math.inf, "epoch": None}

    def state_dict(self) -> dict:
        return {"rows": self.rows, "best": self.best}

    def load_state_dict(self, sd: dict) -> None:
        self.rows, self.best = list(sd["rows"]), dict(sd["best"])

    def train_seconds(self) -> float:
        """Training time of the epochs recorded (mid-epoch --eval-every rows carry none)."""
        return sum(r["train_seconds"] for r in self.rows if "train_seconds" in r)


class EpochTotals:
    """This rank's running sums over the epoch in progress."""

    def __init__(self, tasks):
        self.tasks = tuple(tasks)
        self.reset()

    def reset(self) -> None:
        self.sums = {t: 0.0 for t in self.tasks}
        self.counts = {t: 0 for t in self.tasks}
        self.smart_sum, self.smart_n, self.seen, self.seconds = 0.0, 0, 0, 0.0
        self.cos_sum, self.cos_n = 0.0, 0

    def add(self, task: str, loss: float, n: int, term: float | None) -> None:
        self.sums[task] += loss * n
        self.counts[task] += n
        self.seen += n
        if term is not None:
            self.smart_sum += term * n
            self.smart_n += n

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "smart_sum": self.smart_sum,
                "smart_n": self.smart_n, "seen": self.seen, "seconds": self.seconds,
                "cos_sum": self.cos_sum, "cos_n": self.cos_n}

    def load_state_dict(self, sd: dict) -> None:
        self.sums, self.counts = dict(sd["sums"]), dict(sd["counts"])
        self.smart_sum, self.smart_n, self.seen = sd["smart_sum"], sd["smart_n"], sd["seen"]
        self.seconds, self.cos_sum, self.cos_n = sd["seconds"], sd["cos_sum"], sd["cos_n"]

    def mean_losses(self) -> dict:
        """train_loss_<task> (None for a task not trained yet) and the mean SMART term."""
        return {**{f"train_loss_{k}": (self.sums[k] / self.counts[k] if self.counts[k] else None) for k in self.tasks},
                "smart_term": self.smart_sum / self.smart_n if self.smart_n else None}

    def reduced(self) -> "EpochTotals":
        """The totals over all ranks (identity in one process)."""
        t = self.tasks
        red = distributed.all_reduce_sum([self.sums[k] for k in t] + [self.counts[k] for k in t]
                                         + [self.smart_sum, self.smart_n, self.seen])
        out = EpochTotals(t)
        out.sums = dict(zip(t, red[:len(t)]))
        out.counts = {k: int(round(c)) for k, c in zip(t, red[len(t):2 * len(t)])}
        out.smart_sum, out.smart_n, out.seen = red[-3], int(round(red[-2])), int(round(red[-1]))
        out.cos_sum, out.cos_n = self.cos_sum, self.cos_n
        return out


class ScheduleIdentity:
    """The schedule's definition; a checkpoint of another schedule is refused on resume."""

    def __init__(self, schedule):
        self.schedule = schedule

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        if dict(sd) != self.schedule.state_dict():
            from .checkpoint import CheckpointError
            raise CheckpointError(f"its schedule {dict(sd)} differs from this run's {self.schedule.state_dict()} "
                                  f"(same data, --limit, --schedule, --split-parts, --batch-size and --seed needed)")


# ---- RNG states --------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


class RngState:
    """The python, numpy and torch (and CUDA) generators of this process."""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out = {"python": [version, list(internal), gauss],
               "numpy": [name, base64.b64encode(np.asarray(keys, dtype=np.uint32).tobytes()).decode("ascii"),
                         int(pos), int(has_gauss), float(cached)],
               "torch": _b64(torch.get_rng_state())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
        return out

    def load_state_dict(self, s: dict) -> None:
        version, internal, gauss = s["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype=np.uint32).copy(),
                             pos, has_gauss, cached))
        torch.set_rng_state(_unb64(s["torch"]))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_unb64(x) for x in s["cuda"]])


# ---- non-finite guard ----------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    pass


class NonFiniteGuard:
    """Counts steps whose loss or gradients are NaN/inf. Such a step is skipped (no optimizer
    update); after `max_in_a_row` consecutive ones the run stops with NonFiniteError."""

    def __init__(self, max_in_a_row: int = 5, hint=None):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0
        self.grad_norm = None  # of the last step checked
        self.hint = hint  # () -> str, asked only when the run stops (it may look at the disk)

    @torch.no_grad()
    def bad(self, loss_values, parameters) -> bool:
        """True when any loss value or any gradient holds a NaN or inf (one host sync). Reads
        the gradients once, for their L2 norm (kept as `grad_norm`): a NaN or inf in any
        gradient makes it non-finite. (A norm that overflows fp32, over about 1e19 per tensor,
        counts as non-finite too: such a step is a blow-up.) The max-norm this replaced cost
        several times more on a CPU (benchmarks/bench_nonfinite.py)."""
        checks = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in loss_values]
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = None
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            checks.append(norm.reshape(-1))
        dev = checks[0].device if checks else "cpu"
        values = torch.cat([c.to(dev) for c in checks])
        bad = not bool(torch.isfinite(values).all())
        self.grad_norm = float(norm) if norm is not None else None
        return bad

    def record(self, bad: bool, where: str) -> bool:
        """Record one step; True when it must be skipped. Raises NonFiniteError after K in a row."""
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        log.warning(f"non-finite loss or gradient at {where}: step skipped "
                    f"({self.in_a_row} in a row, {self.total} in all; stop after {self.max_in_a_row})")
        if self.in_a_row >= self.max_in_a_row:
            hint = self.hint() if self.hint is not None else ""
            raise NonFiniteError(
                f"{self.in_a_row} training steps in a row had a NaN or infinite loss or gradient "
                f"(last at {where}); stopping. {hint}Try a lower --lr or --precision fp32.")
        return True

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, sd: dict) -> None:
        self.in_a_row, self.total = int(sd["in_a_row"]), int(sd["total"])


# ---- time budget -----------------------------------------------------------------------------------
class TrainingClock:
    """Training time of the run (evaluation excluded) against --time-budget."""

    def __init__(self, budget_minutes: float | None, spent_before: float = 0.0):
        self.budget = None if budget_minutes is None else 60.0 * float(budget_minutes)
        self.spent_before = float(spent_before)  # seconds of the epochs already finished

    def progress(self, epoch_seconds: float) -> float | None:
        """Fraction of the budget spent (None without a budget)."""
        return None if self.budget is None else (self.spent_before + epoch_seconds) / self.budget

    def exhausted(self, epoch_seconds: float = 0.0) -> bool:
        return self.budget is not None and self.spent_before + epoch_seconds >= self.budget

    def agreed_exhausted(self, epoch_seconds: float) -> bool:
        """exhausted(), decided together under torchrun (one rank stopping alone would leave the
        others waiting in a collective)."""
        spent = self.exhausted(epoch_seconds)
        if self.budget is None or distributed.world() == 1:
            return spent
        return distributed.all_reduce_max([float(spent)])[0] > 0


# ---- signals ---------------------------------------------------------------------------------------
class StopRequest:
    """SIGINT / SIGTERM set a flag instead of interrupting: the loop finishes the current step,
    saves a checkpoint and exits. A second signal of the same kind interrupts at once."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signum = None
        self._signals = signals
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up waiting
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(f"{signal.Signals(signum).name}: finishing the current step, then saving a "
                    f"checkpoint and exiting (send again to stop at once)")

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Stopped(Exception):
    """Training stopped on request after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in "
                         f"{checkpoint}; rerun with --resume to continue")


__all__ = ["EpochTotals", "NonFiniteError", "NonFiniteGuard", "Progress", "RngState", "RunRecord",
           "ScheduleIdentity", "StopRequest", "Stopped", "TrainingClock"]
