"""Crash-safe checkpoints of the whole training state: the `Checkpointer`.

A checkpoint is a directory (`checkpoints/last`, `checkpoints/best`) holding
- model.safetensors + config.json + vocab.txt: the model, as `save_pretrained` writes it (any
  tool that loads a smarter_fast model loads a checkpoint directory), with its sentence-transformers
  modules (modules.json, sentence_bert_config.json, 1_Pooling/, 2_Dense/) truncating at the run's
  --max-length;
- train_state.pt: `{name: component.state_dict()}` for every stateful component the Trainer
  registered (optimizer, LR schedule, weight EMA, SMART teacher, gradient surgery, progress,
  non-finite guard, ...), plus `ranks`: the per-rank components (RNG states, the partial sums of
  the epoch in progress) of every process; loaded with `torch.load(weights_only=True)`;
- trainer_state.json: a readable summary (format version, progress, best score, metrics rows so
  far, the run's configuration) for people and tools.

The Checkpointer knows components only as objects with `state_dict()` / `load_state_dict()`:
adding one to the Trainer's `states` is all it takes to have it saved and resumed.

Atomicity (a SIGKILL at any instant leaves a complete checkpoint behind):
1. everything is written into a fresh temporary sibling directory; every file is fsynced, then
   the directory itself;
2. the old `last` (when present) is renamed to `.last.old`, the temporary directory renamed to
   `last`, the parent directory fsynced, and `.last.old` removed;
3. `find_last_checkpoint` takes `last` when complete, else `.last.old` (a crash between the two
   renames). Leftover temporary directories are ignored and cleaned up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from . import distributed

log = logging.getLogger("smarter_fast")
FORMAT_VERSION = 3  # 3: one train_state.pt of component state dicts (2: optimizer.pt + JSON keys)
CHECKPOINT_FILES = ("model.safetensors", "config.json", "train_state.pt", "trainer_state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (older format, other run)."""


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


def swap_in(tmp, final) -> None:
    """Replace the directory `final` by the complete directory `tmp` with renames, so that at every
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


def _fresh_tmp(directory: Path) -> Path:
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


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


def find_older_checkpoint(out_dir) -> Path | None:
    """`checkpoints/last` (or `.last.old`) when it is a checkpoint of another format (a model
    and trainer_state.json, but not this format's files), else None."""
    ck = Path(out_dir) / "checkpoints"
    for name in ("last", ".last.old"):
        d = ck / name
        if (d / "trainer_state.json").is_file() and (d / "model.safetensors").is_file() and not is_complete(d):
            return d
    return None


def clean_temporaries(out_dir) -> None:
    """Remove temporary checkpoint directories left by a killed run."""
    ck = Path(out_dir) / "checkpoints"
    if ck.is_dir():
        for d in ck.glob(".*.tmp*"):
            shutil.rmtree(d, ignore_errors=True)


def copy_checkpoint(src, dst) -> Path:
    """dst becomes a copy of src, its module folders (1_Pooling/, ...) included (hard links where
    possible: checkpoint files are only ever replaced, never modified in place)."""
    src, dst = Path(src), Path(dst)
    tmp = _fresh_tmp(dst)
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = tmp / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    swap_in(tmp, dst)
    return dst


def read_state(directory) -> dict:
    """The readable summary (trainer_state.json) of a checkpoint."""
    return json.loads((Path(directory) / "trainer_state.json").read_text())


def check_format(directory) -> dict:
    """The summary of a checkpoint this version can resume; CheckpointError otherwise."""
    directory = Path(directory)
    summary = read_state(directory)
    version = summary.get("version")
    if version != FORMAT_VERSION or not (directory / "train_state.pt").is_file():
        raise CheckpointError(
            f"{directory} holds a training checkpoint of format version {version}; this smarter_fast "
            f"resumes version {FORMAT_VERSION} only. Its model still loads everywhere (evaluate, "
            f"--pretrained {directory}); to continue training, start a new run from it with "
            f"--pretrained, or resume with the smarter_fast release that wrote it")
    return summary


# ---- the checkpointer --------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores a set of stateful components and the model, atomically.

    states: {name: component} shared by every rank (rank 0's are saved);
    rank_states: {name: component} of each process (RNG states, partial sums), gathered from
    every rank on save and given back to the same rank on load."""

    def __init__(self, model, states: dict, rank_states: dict | None = None, optional=(),
                 max_seq_length: int | None = None):
        """optional: names of components a checkpoint may lack (those an option adds, such as
        --ema): on resume they start afresh, said on the console, as the option is new.
        max_seq_length: the run's truncation length, recorded for sentence-transformers."""
        self.model, self.states, self.rank_states = model, dict(states), dict(rank_states or {})
        self.optional = set(optional)
        self.max_seq_length = max_seq_length

    def save(self, directory, summary: dict, model=None) -> Path:
        """Write a checkpoint (collective under torchrun: every rank calls; rank 0 writes).
        `model`: the weights to save as the model (default the trained one; the EMA average for
        `best`)."""
        directory = Path(directory)
        ranks = distributed.all_gather_object({k: c.state_dict() for k, c in self.rank_states.items()})
        if distributed.is_main():
            tmp = _fresh_tmp(directory)
            (model or self.model).save_pretrained(tmp, max_seq_length=self.max_seq_length)
            torch.save({"version": FORMAT_VERSION, "ranks": ranks,
                        "states": {k: c.state_dict() for k, c in self.states.items()}},
                       tmp / "train_state.pt")
            text = json.dumps({"version": FORMAT_VERSION, **summary}, indent=1, sort_keys=True, default=str)
            (tmp / "trainer_state.json").write_text(text + "\n")
            swap_in(tmp, directory)
        distributed.barrier()
        return directory

    def load(self, directory, device="cpu") -> dict:
        """Restore every registered component from `directory` (the model's weights are loaded
        by whoever built the model from it). Returns the summary."""
        directory = Path(directory)
        summary = check_format(directory)
        blob = torch.load(directory / "train_state.pt", map_location=device, weights_only=True)
        missing = [k for k in self.states if k not in blob["states"]]
        required = [k for k in missing if k not in self.optional]
        if required:
            raise CheckpointError(f"{directory} has no state for {', '.join(required)}: it was written "
                                  f"by a run with other options")
        for name in missing:
            print(f"{directory} holds no {name} state (the option is new to this run): it starts afresh",
                  flush=True)
        for name, component in self.states.items():
            if name not in missing:
                try:
                    component.load_state_dict(blob["states"][name])
                except (ValueError, KeyError, RuntimeError) as e:  # the run's options differ
                    raise CheckpointError(f"its {name} state does not fit this run: {e}") from None
        ranks = blob.get("ranks") or []
        if len(ranks) == distributed.world():
            for name, component in self.rank_states.items():
                if name in ranks[distributed.rank()]:
                    component.load_state_dict(ranks[distributed.rank()][name])
        else:
            log.warning(
                f"checkpoint was written by {len(ranks)} process(es), this run has "
                f"{distributed.world()}: per-process states (RNG) are not restored")
        return summary


__all__ = ["CHECKPOINT_FILES", "CheckpointError", "Checkpointer", "FORMAT_VERSION", "check_format",
           "clean_temporaries", "copy_checkpoint", "find_last_checkpoint", "find_older_checkpoint", "fsync_path", "is_complete",
           "read_state", "swap_in"]
