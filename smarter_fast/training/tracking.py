"""Step-level tracking (`--report-to csv,tensorboard`): one record per optimizer step and one
per dev evaluation, streamed while training runs.

- csv: OUT/steps.csv (step, epoch, the step's loss per task, SMART term, learning rates applied,
  gradient norm before clipping, examples per second, skipped) and OUT/evals.csv (step, epoch,
  dev metrics). Rows are flushed as they are written.
- tensorboard: event files in OUT/tensorboard (`train/...` and `dev/...` scalars), through
  torch.utils.tensorboard, which needs the optional `tensorboard` package.

On --resume both streams are cut back to the checkpoint's step first (csv: rows after it are
dropped; tensorboard: `purge_step`), so the records of steps trained again after a crash are
not doubled. Only the main process writes.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

from ..tasks import METRIC_KEYS, TASK_NAMES

STEP_FILE, EVAL_FILE, TENSORBOARD_DIR = "steps.csv", "evals.csv", "tensorboard"


def require(targets) -> None:
    """Fails early, with what to install, when a target's package is missing."""
    if "tensorboard" in targets:
        if importlib.util.find_spec("tensorboard") is None:
            raise ModuleNotFoundError(
                "--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                "(or pip install -e '.[tensorboard]')")


def lr_group_names(optimizer) -> list[str]:
    """A name per parameter group: `lr` alone, or per depth under --layer-decay (embeddings,
    layer0..., heads: the pooler and the task heads)."""
    groups = optimizer.param_groups
    if len(groups) == 1 or any("depth" not in g for g in groups):
        return ["lr"] if len(groups) == 1 else [f"lr_group{i}" for i in range(len(groups))]
    top = max(g["depth"] for g in groups)
    return ["lr_embeddings" if g["depth"] == 0 else "lr_heads" if g["depth"] == top
            else f"lr_layer{g['depth'] - 1}" for g in groups]


class Tracker:
    """Writes step and evaluation records to the chosen targets under `out_dir`.
    `resume_step`: the global step of the checkpoint resumed from (None: a fresh run)."""

    def __init__(self, out_dir, targets, lr_names: list[str], resume_step: int | None = None):
        self.out_dir, self.targets = Path(out_dir), tuple(targets)
        self.lr_names = list(lr_names)
        self.step_columns = (["step", "epoch", "task"] + [f"loss_{t}" for t in TASK_NAMES]
                             + ["smart_term"] + (["lr"] if "lr" not in self.lr_names else []) + self.lr_names
                             + ["grad_norm", "examples_per_second", "skipped"])
        self.eval_columns = ["step", "epoch", *METRIC_KEYS, "mean_score"]
        self._files, self._writers, self.board = {}, {}, None
        if "csv" in self.targets:
            for name, columns in ((STEP_FILE, self.step_columns), (EVAL_FILE, self.eval_columns)):
                self._open_csv(name, columns, resume_step)
        if "tensorboard" in self.targets:
            require(self.targets)
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR),
                                       purge_step=None if resume_step is None else resume_step + 1)

    def _open_csv(self, name: str, columns: list[str], resume_step: int | None) -> None:
        path = self.out_dir / name
        kept = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames == columns:
                    kept = [r for r in reader if r["step"] and int(r["step"]) <= resume_step]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, path)
        self._files[name] = open(path, "a", newline="", buffering=1)
        self._writers[name] = csv.DictWriter(self._files[name], columns, extrasaction="ignore")

    def step(self, record: dict) -> None:
        """One optimizer step: keys of `step_columns` (absent ones left empty)."""
        if STEP_FILE in self._writers:
            self._writers[STEP_FILE].writerow({k: _cell(record.get(k)) for k in self.step_columns})
        if self.board is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "epoch", "task", "skipped") and value is not None:
                    self.board.add_scalar(f"train/{key}", value, step)

    def evaluation(self, record: dict) -> None:
        """One dev evaluation: step, epoch and the metrics."""
        if EVAL_FILE in self._writers:
            self._writers[EVAL_FILE].writerow({k: _cell(record.get(k)) for k in self.eval_columns})
        if self.board is not None:
            for key in self.eval_columns[2:]:
                if record.get(key) is not None:
                    self.board.add_scalar(f"dev/{key}", record[key], record["step"])
            self.board.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._writers.clear()
        if self.board is not None:
            self.board.close()
            self.board = None


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


__all__ = ["EVAL_FILE", "STEP_FILE", "TENSORBOARD_DIR", "Tracker", "lr_group_names", "require"]
