"""Crash-safe training state: atomic checkpoint directories, RNG capture, signals, non-finite guard.

A training checkpoint is a directory (`checkpoints/last`, `checkpoints/best`) holding
model.safetensors + config.json + vocab (save_pretrained), optimizer.pt and trainer_state.json.
trainer_state.json carries the schedule position (`epochs_done`: the epoch being trained or,
with `next_step_in_epoch` 0, the next one; `next_step_in_epoch`: index into that epoch's step
list), the global step, the partial sums of the epoch in progress, the metrics rows so far,
the best score, and the python / numpy / torch RNG states (per rank under torchrun).

Atomicity (a SIGKILL at any instant leaves a complete checkpoint behind):
1. everything is written into a fresh temporary sibling directory; every file is fsynced, then
   the directory itself;
2. the old `last` (when present) is renamed to `.last.old`, the temporary directory renamed to
   `last`, the parent directory fsynced, and `.last.old` removed;
3. `find_last_checkpoint` takes `last` when complete, else `.last.old` (a crash between the two
   renames). Leftover temporary directories are ignored and cleaned up.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("smarter_fast")

CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.pt", "trainer_state.json")


# ---- durable files ---------------------------------------------------------------------------
def fsync_path(path) -> None:
    """fsync a file or a directory (best effort where the platform cannot open directories)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(directory) -> None:
    directory = Path(directory)
    for f in directory.rglob("*"):
        if f.is_file():
            fsync_path(f)
    for d in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(d)
    fsync_path(directory)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace directory `final` by the complete directory `tmp` with renames, so that at every
    instant a complete copy exists as `final` or as `.final.old`."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():  # final is complete, so a stale .old is redundant
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)
        fsync_path(final.parent)


def is_complete(directory) -> bool:
    d = Path(directory)
    return all((d / f).is_file() for f in CHECKPOINT_FILES)


def find_last_checkpoint(out_dir) -> Path | None:
    """`checkpoints/last` of out_dir when complete, else `checkpoints/.last.old`, else None."""
    ck = Path(out_dir) / "checkpoints"
    for name in ("last", ".last.old"):
        if is_complete(ck / name):
            return ck / name
    return None


def clean_temporaries(out_dir) -> None:
    """Remove temporary checkpoint directories left by a killed run."""
    ck = Path(out_dir) / "checkpoints"
    if not ck.is_dir():
        return
    for d in ck.glob(".*.tmp*"):
        shutil.rmtree(d, ignore_errors=True)


def write_checkpoint(directory, model, optimizer, state: dict, ema=None, teacher=None) -> Path:
    """Weights + config + vocab, optimizer.pt and trainer_state.json, atomically (see module doc);
    with `ema` (smarter_fast.ema.WeightEma) also its averaged weights (ema.safetensors), with
    `teacher` (smarter_fast.smart.EmaTeacher) the full-SMART teacher (smart_teacher.safetensors)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for average in (ema, teacher):
        if average is not None:
            average.save(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    swap_in(tmp, directory)
    return directory


def copy_checkpoint(src, dst) -> Path:
    """dst becomes a copy of src (hard links where possible: checkpoint files are only ever
    replaced, never modified in place)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    swap_in(tmp, dst)
    return dst


def read_state(directory) -> dict:
    return json.loads((Path(directory) / "trainer_state.json").read_text())


# ---- RNG states ------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def get_rng_state() -> dict:
    """JSON-able python, numpy, torch (and CUDA) RNG states of this process."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(internal), gauss],
           "numpy": [name, base64.b64encode(np.asarray(keys, dtype=np.uint32).tobytes()).decode("ascii"),
                     int(pos), int(has_gauss), float(cached)],
           "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype=np.uint32).copy(),
                         pos, has_gauss, cached))
    torch.set_rng_state(_unb64(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(x) for x in s["cuda"]])


# ---- signals ---------------------------------------------------------------------------------
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

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class Stopped(Exception):
    """Training stopped on request after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in "
                         f"{checkpoint}; rerun with --resume to continue")


# ---- non-finite guard ------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    pass


class NonFiniteGuard:
    """Counts steps whose loss or gradients are NaN/inf. Such a step is skipped (no optimizer
    update); after `max_in_a_row` consecutive ones the run stops with NonFiniteError."""

    def __init__(self, max_in_a_row: int = 5, in_a_row: int = 0, total: int = 0):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, in_a_row, total

    @staticmethod
    @torch.no_grad()
    def bad(loss_values, parameters) -> bool:
        """True when any loss value or any gradient holds a NaN or inf (one host sync)."""
        checks = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in loss_values]
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            # max |g| per tensor: inf when any is inf, NaN when any is NaN; never overflows
            checks += [n.reshape(-1).float() for n in torch._foreach_norm(grads, ord=math.inf)]
        dev = checks[0].device if checks else "cpu"
        return not bool(torch.isfinite(torch.cat([c.to(dev) for c in checks])).all())

    def record(self, bad: bool, where: str, checkpoint_hint: str = "") -> bool:
        """Record one step; True when it must be skipped. Raises NonFiniteError after K in a row."""
        if not bad:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        log.warning(f"non-finite loss or gradient at {where}: step skipped "
                    f"({self.in_a_row} in a row, {self.total} in all; stop after {self.max_in_a_row})")
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} training steps in a row had a NaN or infinite loss or gradient "
                f"(last at {where}); stopping. {checkpoint_hint}Try a lower --lr or --precision fp32.")
        return True

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}


__all__ = ["CHECKPOINT_FILES", "NonFiniteError", "NonFiniteGuard", "StopRequest", "Stopped",
           "clean_temporaries", "copy_checkpoint", "find_last_checkpoint", "fsync_path",
           "get_rng_state", "is_complete", "read_state", "set_rng_state", "swap_in",
           "write_checkpoint"]


# ---- the run's resumable state -----------------------------------------------------------------
class RunState:
    """What the training loop needs to be stopped and resumed at any step: the model, optimizer
    and where to save; the schedule position; per-rank partial sums of the epoch in progress and
    RNG states; the metrics rows so far; the non-finite guard; the stop flag (signals)."""

    def __init__(self, model, optimizer, out_dir=None, schedule_state=None, args=None,
                 forward=None, device="cpu", version: int = 2):
        from . import distributed
        self.dist = distributed
        self.model, self.optimizer = model, optimizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.schedule_state = schedule_state
        self.args = args
        self.forward = forward or (lambda fn, *a, **k: fn(model, *a, **k))
        self.device = device
        self.version = version
        self.best = {"mean_score": -math.inf, "epoch": None}
        self.metrics: list[dict] = []
        self.guard = NonFiniteGuard(getattr(args, "max_nonfinite", 5) if args is not None else 5)
        self.stop = StopRequest()
        self.save_every = getattr(args, "save_every", None) if args is not None else None
        self.pending = None  # (epoch, position, partial sums, rng) of a mid-epoch resume
        self.ema = None  # smarter_fast.ema.WeightEma with --ema: saved with `last`
        self.teacher = None  # smarter_fast.smart.EmaTeacher with --smart-full-bregman: the same
        self.surgery = None  # smarter_fast.surgery.GradientSurgery: its state in trainer_state

    # -- resume ---------------------------------------------------------------------------------
    def load(self, state: dict) -> tuple[int, int]:
        """Adopt a checkpoint's trainer state; returns (epoch to start, global step)."""
        self.best = state["best"]
        self.metrics = list(state.get("metrics", []))
        g = state.get("nonfinite", {})
        self.guard.in_a_row, self.guard.total = g.get("in_a_row", 0), g.get("total", 0)
        ranks = state.get("ranks")
        mine = ranks[self.dist.rank()] if ranks and len(ranks) == self.dist.world() else None
        if ranks and mine is None:
            log.warning(f"checkpoint was written by {len(ranks)} process(es), this run has "
                        f"{self.dist.world()}: RNG states are not restored")
        epoch, position = state["epochs_done"], state.get("next_step_in_epoch", 0)
        if mine is not None:
            set_rng_state(mine["rng"])
        if position:
            self.pending = (epoch, position, (mine or {}).get("partial"))
        return epoch, state["global_step"]

    # -- the epoch -------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, seed_fn) -> tuple[int, dict | None]:
        """(first step position, partial sums or None). Seeds torch with seed_fn() at a fresh
        epoch; a mid-epoch resume keeps the restored RNG state instead."""
        if self.pending is not None and self.pending[0] == epoch:
            _, position, partial = self.pending
            self.pending = None
            return position, partial
        self.pending = None
        torch.manual_seed(seed_fn())
        return 0, None

    def check_step(self, losses, where: str, seconds: float = 0.0) -> bool:
        """After backward: True when the step must be skipped (non-finite on any rank). Also
        agrees across ranks on whether a stop was requested (self.stop_now) and on the epoch's
        training time so far (self.agreed_seconds: the slowest rank's `seconds`), which the LR
        schedule of a --time-budget run follows."""
        bad = NonFiniteGuard.bad(losses, self.model.parameters())
        bad_any, stop_any, self.agreed_seconds = self.dist.all_reduce_max(
            [float(bad), float(self.stop.requested), float(seconds)], self.device)
        self.stop_now = stop_any > 0
        hint = (f"The last good checkpoint is in {self.out_dir / 'checkpoints' / 'last'}. "
                if self.out_dir is not None and find_last_checkpoint(self.out_dir) else "")
        return self.guard.record(bad_any > 0, where, hint)

    def after_step(self, epoch: int, position: int, n_steps: int, global_step: int, partial: dict):
        """Mid-epoch checkpoint every --save-every steps; on a stop request, save and raise Stopped."""
        stop = getattr(self, "stop_now", False)
        periodic = self.save_every and global_step % self.save_every == 0 and position < n_steps
        if not (stop or periodic) or self.out_dir is None:
            return
        last = self.save(epoch, position, global_step, partial)
        if stop:
            raise Stopped(self.stop.signum or 2, last)

    # -- saving ----------------------------------------------------------------------------------
    def trainer_state(self, epochs_done: int, position: int, global_step: int, partial=None) -> dict:
        """The trainer_state.json of a checkpoint (collective under torchrun: every rank calls it)."""
        ranks = self.dist.all_gather_object({"rng": get_rng_state(), "partial": partial})
        return {"version": self.version, "epochs_done": epochs_done, "next_step_in_epoch": position,
                "global_step": global_step, "best": self.best, "metrics": self.metrics,
                "nonfinite": self.guard.state_dict(), "schedule": self.schedule_state,
                "world_size": self.dist.world(), "ranks": ranks,
                "seed": getattr(self.args, "seed", None),
                **({"ema": self.ema.state()} if self.ema is not None else {}),
                **({"teacher": self.teacher.state()} if self.teacher is not None else {}),
                **({"surgery": self.surgery.state_dict()} if self.surgery is not None else {}),
                "args": {k: v for k, v in vars(self.args).items()} if self.args is not None else {}}

    def save(self, epochs_done: int, position: int, global_step: int, partial=None) -> Path | None:
        """Write checkpoints/last (rank 0; every rank must call). Returns its path."""
        state = self.trainer_state(epochs_done, position, global_step, partial)
        last = self.out_dir / "checkpoints" / "last"
        if self.dist.is_main():
            write_checkpoint(last, self.model, self.optimizer, state, ema=self.ema,
                             teacher=self.teacher)
        self.dist.barrier()
        return last
