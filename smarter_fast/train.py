"""Multi-task fine-tuning of BERT on SST, Quora and STS, with optional SMART ("SMARTer BERT").

    python -m smarter_fast.train [--data-dir DIR] [--epochs 10] [--schedule split1] ...

With no --data-dir: ./data when it holds the CS224N files, else the built-in SYNTHETIC demo data
(smarter_fast.data.demo), generated into the run directory. Defaults follow the report's best
recipe: split1, no SMART, dropout 0, lr 1e-5, batch 8, 10 epochs.

Writes into --out (default runs/<date-time>/):
  metrics.jsonl            one JSON object per epoch (dev metrics, training loss per task, speed)
  checkpoints/last, best   model.safetensors + config.json + vocab (save_pretrained),
                           optimizer.pt (optimizer state dict), trainer_state.json (schedule state)
  predictions/             leaderboard .csv files of the best checkpoint (dev and test-student)
  plots/                   training_loss.png, dev_metrics.png, sst_confusion.png
  dev_metrics.json         dev metrics of the best checkpoint

An epoch is a deterministic list of (task, example indices) steps (smarter_fast.data.schedules),
and every epoch seeds the torch RNG from (seed, epoch), so a run resumed at an epoch boundary
(--resume) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning threads make
# torch several times slower (measured 6x on 2 busy cores); set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Transparent huge pages for torch's large CPU buffers: the dense word-embedding gradient
# (30522 x 384, fresh each step) is zeroed 4x faster (21.7 ms -> 5.5 ms measured here) when it
# faults in 2 MiB pages instead of 4 KiB ones. Read by torch once, at its first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch

from .data.cs224n import DataError, find_data_files, load_cs224n
from .data.schedules import SAMPLERS, SCHEDULES, TASK_ORDER, Schedule, resolve_split_parts
from .precision import PRECISIONS, resolve_precision
from .recipes import RECIPES, format_settings, recipe_defaults
from .recipes import describe as describe_recipe
from .losses import task_loss
from .smart import SMART_MODES, smart_simple_loss, step_seed, task_forward

log = logging.getLogger("smarter_fast")

CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.pt", "trainer_state.json")
STATE_VERSION = 2  # 2: mid-epoch position, RNG states, metrics rows (smarter_fast.state)
REPORT_LR = 1e-5  # the report's best recipe
DEMO_LR = 1e-4  # the demo data gets ~800 steps: at 1e-5 the fresh heads barely move
DEFAULT_EPOCHS = 10
UNBOUNDED_EPOCHS = 10_000  # --time-budget without --epochs: the budget ends training


class UsageError(Exception):
    """A problem to report as one clean line (no traceback)."""


# ---- arguments -------------------------------------------------------------------------------------
def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _float(name, low=None, high=None, low_open=False, high_open=False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if low is not None and (v < low or (low_open and v == low)):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")
        if high is not None and (v > high or (high_open and v == high)):
            raise argparse.ArgumentTypeError(f"{name} must be {'<' if high_open else '<='} {high}, got {v}")
        return v
    return parse


def _split_parts(text):
    if text == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split-parts must be 'auto' or a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--split-parts must be 'auto' or >= 1, got {v}")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help does not already say it and there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smarter_fast.train",
        description="Multi-task fine-tuning of BERT on SST, Quora and STS (CS224N minBERT), "
                    "with the schedules and SMART regularisation of 'SMARTer BERT'.",
        formatter_class=_HelpFormatter)
    d = p.add_argument_group("data and model")
    d.add_argument("--data-dir", default=None,
                   help="CS224N data directory (ids-sst-*.csv, quora-*.csv, sts-*.csv); default: "
                        "./data if it holds them, else the built-in SYNTHETIC demo data")
    d.add_argument("--pretrained", default=None,
                   help="Hugging Face BERT directory; default: the embedded all-MiniLM-L6-v2")
    d.add_argument("--limit", type=_positive_int("--limit"), default=None,
                   help="keep the first N rows of each training file")
    d.add_argument("--max-length", type=_positive_int("--max-length"), default=128,
                   help="truncate encoded sequences to this many tokens")
    d.add_argument("--pooling", choices=("cls", "mean"), default=None,
                   help="sentence vector: the [CLS] pooler output or the mean of the last hidden "
                        "states (default: the checkpoint's, else cls)")
    d.add_argument("--pair-features", choices=("cross", "bi", "both"), default=None,
                   help="paraphrase/similarity head input: cross (one [CLS] s1 [SEP] s2 [SEP] "
                        "sequence), bi (s1, s2 encoded apart: [u*v, |u-v|, cos]) or both "
                        "(default: the checkpoint's, else cross)")
    d.add_argument("--pair-order", choices=("given", "symmetric"), default=None,
                   help="paraphrase/similarity pairs: given (s1 then s2) or symmetric (trained in "
                        "a random order per example, predicted as the mean over both orders; "
                        "twice the inference work for pairs) (default: the checkpoint's, else given)")
    t = p.add_argument_group("training")
    t.add_argument("--recipe", choices=tuple(RECIPES), default="report",
                   help="preset of the flags below: report (the report's recipe, the defaults) or "
                        "minilm-cpu (the best found for the embedded checkpoint on a CPU); "
                        "explicit flags override it")
    t.add_argument("--epochs", type=_positive_int("--epochs"), default=None,
                   help=f"training epochs (default: {DEFAULT_EPOCHS}; with --time-budget: until "
                        f"the budget is spent)")
    t.add_argument("--time-budget", type=_float("--time-budget", 0.0, low_open=True), default=None,
                   metavar="MINUTES",
                   help="stop training after this many minutes of training (checked every step; "
                        "evaluation not counted), then evaluate and save; LR schedules decay to "
                        "the budget's end")
    t.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8,
                   help="training batch size (per process)")
    t.add_argument("--eval-batch-size", type=_positive_int("--eval-batch-size"), default=64,
                   help="batch size for dev and test evaluation")
    t.add_argument("--lr", type=_float("--lr", 0.0, low_open=True), default=None,
                   help=f"learning rate (default: {REPORT_LR:g}, the report's recipe; "
                        f"{DEMO_LR:g} on the SYNTHETIC demo data, which must train in minutes)")
    t.add_argument("--weight-decay", type=_float("--weight-decay", 0.0), default=0.0,
                   help="AdamW decoupled weight decay")
    t.add_argument("--schedule", choices=SCHEDULES, default="split1",
                   help="baseline: all data every epoch; split1: Quora in N parts, one per epoch; "
                        "split2: Quora and STS in N parts")
    t.add_argument("--split-parts", type=_split_parts, default="auto",
                   help="N for split1/split2; auto = round(|Quora train| / |SST train|)")
    t.add_argument("--interleave", action="store_true",
                   help="alternate batches among tasks instead of task after task")
    t.add_argument("--dropout", type=_float("--dropout", 0.0, 1.0, high_open=True), default=0.0,
                   help="dropout before the task heads")
    t.add_argument("--label-smoothing", type=_float("--label-smoothing", 0.0, 1.0, high_open=True), default=0.0,
                   help="label smoothing of the SST cross-entropy (0: off)")
    t.add_argument("--ensemble", type=_positive_int("--ensemble"), default=1, metavar="K",
                   help="train K models one after another (seeds SEED, SEED+1, ...; each with 1/K of "
                        "--time-budget) in OUT/member1..K, then evaluate them as one: their dev and "
                        "test outputs averaged into OUT/dev_metrics.json and OUT/predictions")
    t.add_argument("--ema", type=_float("--ema", 0.0, 1.0, high_open=True), default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999; 0: off); dev evaluation, checkpoints/best and the predictions "
                        "then use the averaged weights")
    s = p.add_argument_group("SMART")
    s.add_argument("--smart", choices=SMART_MODES, default="off",
                   help="simple: the report's Algorithm 1 (noise on the embeddings); "
                        "full: adversarial SMART (Jiang et al.; --smart-full-* flags)")
    s.add_argument("--smart-sigma", type=_float("--smart-sigma", 0.0), default=0.05,
                   help="standard deviation of the embedding noise")
    s.add_argument("--smart-lambda", type=_float("--smart-lambda", 0.0), default=10.0,
                   help="weight of the SMART term")
    r = p.add_argument_group("run")
    r.add_argument("--backend", choices=("auto", "ref", "cpp", "triton"), default=None,
                   help="kernels for attention, AdamW and SMART (default: $SMARTER_FAST_BACKEND or auto)")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast with fp32 master weights; auto: bf16 where the device runs it "
                        "natively (GPUs with bf16, CPUs with AVX512-BF16 or AMX), else fp32")
    r.add_argument("--seed", type=int, default=11711,
                   help="seed for shuffling, dropout, noise and initialisation")
    r.add_argument("--out", default=None, help="output directory (default: runs/<date-time>/)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (start afresh if there is none)")
    r.add_argument("--save-every", type=_positive_int("--save-every"), default=None,
                   help="also checkpoint (checkpoints/last) every N training steps, mid-epoch "
                        "included (default: at epoch ends only)")
    r.add_argument("--max-nonfinite", type=_positive_int("--max-nonfinite"), default=5,
                   help="steps with a NaN/inf loss or gradient are skipped; stop after this many in a row")
    d.add_argument("--strict", action="store_true",
                   help="malformed data rows are errors (file, line, field) instead of skipped")
    r.add_argument("--num-threads", type=_positive_int("--num-threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")
    from . import beyond
    beyond.add_args(p)  # full SMART, LR schedules, layer decay, gradient surgery
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.recipe != "report":  # the recipe's values become the defaults; explicit flags win
        defaults = recipe_defaults(args.recipe)
        # model options the recipe alone sets: on --resume the checkpoint's own take precedence
        from_recipe = [k for k in MODEL_OPTIONS if k in defaults and getattr(args, k) is None]
        p.set_defaults(**defaults)
        args = p.parse_args(argv)
        args.model_options_from_recipe = from_recipe
    from . import beyond
    beyond.check_args(args, p.error)
    if args.epochs is None and args.time_budget is None:
        args.epochs = DEFAULT_EPOCHS
    if args.epochs is None and args.schedule == "annealed":
        p.error("--schedule annealed needs --epochs (the horizon of its annealing), also with --time-budget")
    if args.max_length < 8:
        p.error(f"--max-length must be >= 8, got {args.max_length}")
    if args.max_length > 512:
        p.error(f"--max-length must be <= 512 (BERT position embeddings), got {args.max_length}")
    if args.schedule not in ("split1", "split2") and args.split_parts not in ("auto", 1):
        log.warning(f"--split-parts is ignored by --schedule {args.schedule}")
    for mode in ("simple", "full"):  # flags of the SMART mode not in use
        unused = [a.option_strings[0] for a in p._actions
                  if (a.dest.startswith("smart_full_") if mode == "full" else a.dest in ("smart_sigma", "smart_lambda"))
                  and getattr(args, a.dest) != a.default]
        if unused and args.smart != mode:
            log.warning(f"{', '.join(unused)} only apply to --smart {mode}; ignored with --smart {args.smart}")
    if args.schedule in SAMPLERS and args.interleave:
        log.warning(f"--interleave is ignored by --schedule {args.schedule}: its sampler already "
                    f"interleaves the tasks' batches")
    if args.backend is None:
        args.backend = os.environ.get("SMARTER_FAST_BACKEND", "auto") or "auto"
        if args.backend not in ("auto", "ref", "cpp", "triton"):
            p.error(f"SMARTER_FAST_BACKEND={args.backend!r}: expected auto, ref, cpp or triton")
    if args.pretrained is not None and not Path(args.pretrained).is_dir():
        p.error(f"--pretrained {args.pretrained}: directory not found (expected a Hugging Face "
                f"BERT directory with config.json, model.safetensors and vocab.txt)")
    if args.pretrained is not None:
        from .validation import check_pretrained_dir
        problem = check_pretrained_dir(args.pretrained)
        if problem:
            p.error(problem)
    return args


# ---- setup helpers ---------------------------------------------------------------------------------
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


def budget_spent(clock: "TrainingClock", epoch_seconds: float) -> bool:
    """clock.exhausted, decided together under torchrun (each rank's own clock differs a little:
    one rank stopping alone would leave the others waiting in a collective)."""
    from .distributed import all_reduce_max, world
    spent = clock.exhausted(epoch_seconds)
    if clock.budget is None or world() == 1:
        return spent
    return all_reduce_max([float(spent)])[0] > 0


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def _setup_logging() -> None:
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _checkpoint_desc(path) -> str:
    if path is None:
        from .model import default_checkpoint_dir
        try:
            return f"embedded all-MiniLM-L6-v2 ({default_checkpoint_dir()})"
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    return str(path)


def resolve_data_dir(arg, out_dir: Path) -> tuple[Path, str, bool]:
    """(directory, description, synthetic). Raises DataError for a bad --data-dir."""
    if arg is not None:
        find_data_files(arg)
        return Path(arg), f"CS224N data in {arg}", False
    local = Path("data")
    try:
        find_data_files(local)
        return local, f"CS224N data in ./{local}", False
    except DataError:
        pass
    from .data.demo import write_demo_data
    from .distributed import demo_data_dir
    directory = write_demo_data(demo_data_dir(out_dir))
    return directory, (f"SYNTHETIC demo data generated in {directory} (no --data-dir and no "
                       f"CS224N files in ./data; metrics are for the synthetic set only)"), True


def _last_checkpoint(out_dir: Path) -> Path | None:
    from .state import find_last_checkpoint
    return find_last_checkpoint(out_dir)  # `last`, or `.last.old` after a crash between renames


MODEL_OPTIONS = ("pooling", "pair_features", "pair_order")


def _model_options(args, resume_dir) -> dict:
    """{"pooling", "pair_features", "pair_order"} of the model to train (how pairs are encoded):
    on --resume the checkpoint's (a different explicit flag is an error; a recipe's default
    gives way), else the flags, else as saved in --pretrained, else cls / cross. Written back
    into args (args.json)."""
    from .model import MultitaskBert
    src = resume_dir if resume_dir is not None else args.pretrained
    try:
        if resume_dir is not None:
            options = MultitaskBert.resolve_options(src)
            for key, value in options.items():
                asked = getattr(args, key, None)
                if asked is not None and asked != value and key in getattr(args, "model_options_from_recipe", ()):
                    print(f"--recipe {args.recipe}'s {key.replace('_', '-')} {asked} gives way to the "
                          f"checkpoint's {value} on --resume", flush=True)
                elif asked is not None and asked != value:
                    flag = "--" + key.replace("_", "-")
                    raise UsageError(f"cannot resume from {resume_dir} with {flag} {asked}: it "
                                     f"was trained with {flag} {value}")
        else:
            options = MultitaskBert.resolve_options(src, getattr(args, "pooling", None),
                                                    getattr(args, "pair_features", None),
                                                    getattr(args, "pair_order", None))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        raise UsageError(str(e)) from None
    for key, value in options.items():
        setattr(args, key, value)
    return options


# ---- checkpoints (atomic, fsynced: smarter_fast.state) ---------------------------------------------
def save_training_checkpoint(directory: Path, model, optimizer, state: dict, ema=None,
                             teacher=None) -> Path:
    from .state import write_checkpoint
    return write_checkpoint(directory, model, optimizer, state, ema=ema, teacher=teacher)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    from .state import copy_checkpoint as copy
    return copy(src, dst)


# ---- training ----------------------------------------------------------------------------------------
def pair_swaps(args, task: str, global_step: int, n: int):
    """--pair-order symmetric: which of the n pairs of this step's batch are fed as (s2, s1), half
    at random; a function of (seed, step), so a resumed run draws the same. None otherwise."""
    if getattr(args, "pair_order", "given") != "symmetric" or task == "sst":
        return None
    return np.random.default_rng([args.seed, 7_211, global_step]).random(n) < 0.5


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_epoch(model, optimizer, schedule: Schedule, train_data: dict, epoch: int, args,
                device, global_step: int, epoch_label: str, synthetic: bool, run_state=None,
                extras=None, clock: TrainingClock | None = None):
    """One epoch; returns (stats dict, new global_step).

    With a `clock` holding a --time-budget the epoch ends early, after the step that spends the
    budget (stats["budget_exhausted"]), and the LR schedule follows the fraction spent.

    With a `run_state` (smarter_fast.state.RunState) the epoch may start mid-way (resume), steps
    with a non-finite loss or gradient are skipped, checkpoints are written every --save-every
    steps and on SIGINT/SIGTERM, and under torchrun each rank trains its shard of every global
    batch (smarter_fast.distributed)."""
    from tqdm import tqdm
    from .distributed import all_reduce_max, all_reduce_sum, is_main, shard, world
    from .state import RunState
    if extras is not None and extras.surgery is not None:  # one batch of every task per step
        return extras.surgery_epoch(model, optimizer, schedule, train_data, epoch, args, device,
                                    global_step, epoch_label, synthetic, _to, clock, run_state)
    rs = run_state if run_state is not None else RunState(model, optimizer, args=args)
    clock = clock or TrainingClock(None)
    exhausted = False
    steps = schedule.epoch_steps(epoch)
    total_examples = sum(len(ix) for _, ix in steps)
    autocast = args.precision == "bf16"
    model.train()
    # dropout masks: fixed per (seed, epoch); a mid-epoch resume restores the saved RNG state
    start, partial = rs.begin_epoch(epoch, lambda: step_seed(args.seed, 10_000_019 + epoch))
    p = partial or {"sums": {t: 0.0 for t in TASK_ORDER}, "counts": {t: 0 for t in TASK_ORDER},
                    "smart_sum": 0.0, "smart_n": 0, "seen": 0, "seconds": 0.0}
    sums, counts = p["sums"], p["counts"]
    running = None
    t0 = time.perf_counter()
    done_before = sum(len(ix) for _, ix in steps[:start])
    bar = tqdm(total=total_examples, initial=done_before, disable=not is_main(),
               desc=f"epoch {epoch_label}" + (" [SYNTHETIC]" if synthetic else ""),
               unit="ex", dynamic_ncols=True, mininterval=1.0, leave=False, file=sys.stderr)
    try:
        with rs.stop:
            for position in range(start, len(steps)):
                task, global_indices = steps[position]
                # this rank's part (positions in the global batch), and the pair orders drawn for
                # the whole global batch, so that every world size trains the same orders
                part, weight = shard(range(len(global_indices)))
                indices = [global_indices[i] for i in part]
                swaps = pair_swaps(args, task, global_step, len(global_indices))
                batch = _to(train_data[task].batch(indices, swap=None if swaps is None else swaps[part]),
                            device)

                def compute(m, task=task, batch=batch):
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                        if extras is not None:  # off | simple | full (smarter_fast.beyond)
                            total, loss, term = extras.step_loss(m, task, batch, global_step)
                        elif args.smart == "simple":
                            total, loss, term, _ = smart_simple_loss(
                                m, task, batch, args.smart_sigma, args.smart_lambda,
                                step_seed(args.seed, global_step), backend=args.backend,
                                label_smoothing=args.label_smoothing)
                        else:
                            out = task_forward(m, task, batch)
                            loss = task_loss(task, out, batch["labels"], label_smoothing=args.label_smoothing)
                            total, term = loss, None
                    return total, loss, term

                total, loss, term = rs.forward(compute)
                (total * weight if weight != 1.0 else total).backward()
                skip = rs.check_step([loss.detach(), total.detach()],
                                     f"epoch {epoch_label}, step {position + 1}/{len(steps)} "
                                     f"(global step {global_step + 1}, {task})",
                                     seconds=p["seconds"] + time.perf_counter() - t0)
                if not skip:
                    if extras is not None:  # LR schedule (the epoch's time as all ranks agree)
                        extras.before_step(global_step, clock.progress(rs.agreed_seconds))
                    optimizer.step()
                    if extras is not None:
                        extras.after_step(model)  # EMA teacher, --ema average
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                n = len(indices) if weight > 0 else 0
                if not skip:
                    value = float(loss.detach())
                    sums[task] += value * n
                    counts[task] += n
                    if term is not None:
                        p["smart_sum"] += float(term.detach()) * n
                        p["smart_n"] += n
                    running = value if running is None else 0.98 * running + 0.02 * value
                p["seen"] += n
                bar.update(len(global_indices))
                elapsed = time.perf_counter() - t0
                if running is not None:
                    bar.set_postfix_str(f"{task} loss {running:.3f}, {p['seen'] * world() / max(elapsed, 1e-9):.1f} ex/s",
                                        refresh=False)
                p_now = {**p, "seconds": p["seconds"] + time.perf_counter() - t0}
                rs.after_step(epoch, position + 1, len(steps), global_step, p_now)
                if budget_spent(clock, p_now["seconds"]):
                    exhausted = True
                    break
    finally:
        bar.close()
    seconds = all_reduce_max([p["seconds"] + time.perf_counter() - t0])[0]  # the slowest rank's
    # totals over ranks (identity in one process)
    red = all_reduce_sum([sums[t] for t in TASK_ORDER] + [counts[t] for t in TASK_ORDER]
                         + [p["smart_sum"], p["smart_n"], p["seen"]])
    sums = dict(zip(TASK_ORDER, red[:3]))
    counts = {t: int(round(c)) for t, c in zip(TASK_ORDER, red[3:6])}
    smart_sum, smart_n, seen = red[6], int(round(red[7])), int(round(red[8]))
    stats = {
        "train_seconds": seconds,
        "train_examples": seen,
        "examples_per_second": seen / seconds if seconds > 0 else 0.0,
        "steps": len(steps),
        **{f"train_examples_{t}": counts[t] for t in TASK_ORDER},
        **{f"train_loss_{t}": (sums[t] / counts[t] if counts[t] else None) for t in TASK_ORDER},
        "smart_term": smart_sum / smart_n if smart_n else None,
        "nonfinite_skipped": rs.guard.total,
        "budget_exhausted": exhausted,
    }
    return stats, global_step


def run_dir(args) -> Path:
    """--out, else runs/<date-time>/."""
    return Path(args.out) if args.out else Path("runs") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run(args) -> int:
    from .data.tokenize import load_tokenizer
    from .evaluate import encode_split, evaluate_dev, write_evaluation
    from .model import MultitaskBert
    from .optim import AdamW
    from .report import atomic_write_json, atomic_write_text, format_metrics, plot_learning_curves, read_metrics

    from . import distributed as dist
    from .state import RunState, clean_temporaries, copy_checkpoint as _copy_ck, is_complete, read_state

    _setup_logging()
    dist_device = dist.init()  # torchrun: process group, this rank's device; None otherwise
    main_rank = dist.is_main()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    out_dir = run_dir(args)
    out_dir = Path(dist.broadcast_object(str(out_dir)))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    resume_dir = _last_checkpoint(out_dir) if args.resume else None
    ck_dir = out_dir / "checkpoints"
    try:
        data_dir, data_desc, synthetic = resolve_data_dir(args.data_dir, out_dir)
    except DataError as e:
        raise UsageError(str(e)) from None
    if resume_dir is not None:
        ck_desc = f"{resume_dir} (resuming; started from {_checkpoint_desc(args.pretrained)})"
    else:
        ck_desc = _checkpoint_desc(args.pretrained)
    print(f"data: {data_desc} | checkpoint: {ck_desc}", flush=True)
    if args.lr is None:
        args.lr = DEMO_LR if synthetic else REPORT_LR
        if synthetic:
            print(f"SYNTHETIC demo recipe: --lr {DEMO_LR:g} (the report's {REPORT_LR:g} needs more "
                  f"steps than the demo has; pass --lr to choose)", flush=True)
    parser_defaults = {a.dest: a.default for a in build_parser()._actions}
    parser_defaults["lr"] = DEMO_LR if synthetic else REPORT_LR
    if args.resume and resume_dir is None:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints' / 'last'}; starting afresh", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if main_rank:
        clean_temporaries(out_dir)
    tag = " [SYNTHETIC]" if synthetic else ""

    device = dist_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _resolve_precision(args, device, main_rank)
    if args.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU does not support bfloat16")
    _seed_everything(args.seed)

    # Data: read, tokenize, check.
    t_setup = time.perf_counter()
    tokenizer = load_tokenizer(args.pretrained, max_length=args.max_length)
    try:
        train_split = load_cs224n(data_dir, "train", limit=args.limit, strict=args.strict)
        dev_split = load_cs224n(data_dir, "dev", strict=args.strict)
    except DataError as e:
        raise UsageError(str(e)) from None
    for split in (train_split, dev_split):
        empty = [t for t in TASK_ORDER if not getattr(split, t)]
        if empty:
            raise UsageError(f"no usable {split.split} examples for {', '.join(empty)} in {data_dir}")
    unset = [k for k in ("pooling", "pair_features", "pair_order") if getattr(args, k, None) is None]
    options = _model_options(args, resume_dir)  # pooling, pair_features, pair_order: the pair batches
    parser_defaults.update({k: options[k] for k in unset})  # not asked for: the checkpoint's choice
    recipe_settings, overrides = describe_recipe(args.recipe, args, parser_defaults)
    print(f"recipe {args.recipe}: {format_settings(recipe_settings)}"
          + ("; set by flags: " + ", ".join(f"{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in overrides.items())
             if overrides else ""), flush=True)
    if options != {"pooling": "cls", "pair_features": "cross", "pair_order": "given"}:
        print(f"model: pooling {options['pooling']}, pair features {options['pair_features']}, "
              f"pair order {options['pair_order']}", flush=True)
    symmetric = options["pair_order"] == "symmetric"
    train_data = encode_split(train_split, tokenizer, options["pair_features"], symmetric)
    dev_data = encode_split(dev_split, tokenizer, options["pair_features"], symmetric)
    sizes = {t: len(train_data[t]) for t in TASK_ORDER}
    parts = resolve_split_parts(args.split_parts, sizes["sst"], sizes["quora"])
    schedule = Schedule(args.schedule, {t: train_data[t].lengths for t in TASK_ORDER},
                        args.batch_size * dist.world(),  # global batch; each rank trains its shard
                        seed=args.seed, parts=parts, interleave=args.interleave, epochs=args.epochs or 1)
    part_note = f", {parts} parts" if args.schedule in ("split1", "split2") else ""
    per_epoch = schedule.epoch_counts(0)
    print(f"train: sst {sizes['sst']}, quora {sizes['quora']}, sts {sizes['sts']} examples; "
          f"schedule {args.schedule}{part_note}{' interleaved' if args.interleave else ''}: "
          f"epoch 1 trains sst {per_epoch['sst']} + quora {per_epoch['quora']} + sts {per_epoch['sts']}; "
          f"dev: sst {len(dev_data['sst'])}, quora {len(dev_data['quora'])}, sts {len(dev_data['sts'])}",
          flush=True)

    # Model and optimizer (from the last checkpoint when resuming).
    try:
        model = MultitaskBert.from_pretrained(resume_dir if resume_dir is not None else args.pretrained,
                                              dropout=args.dropout, backend=args.backend, **options)
    except Exception as e:  # corrupt or foreign checkpoint (safetensors, torch.load, shapes)
        from .ops import BackendUnavailableError
        if isinstance(e, (BackendUnavailableError, ModuleNotFoundError, MemoryError)):
            raise
        src = resume_dir if resume_dir is not None else (args.pretrained or "the embedded checkpoint")
        raise UsageError(f"cannot load the checkpoint in {src}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    model.to(device).train()
    from . import beyond
    optimizer = AdamW(beyond.optimizer_params(model, args), lr=args.lr, weight_decay=args.weight_decay,
                      backend=args.backend)
    extras = beyond.Extras(args, model, optimizer, schedule)
    if extras.describe():
        print(f"options: {extras.describe()}", flush=True)

    start_epoch, global_step, best = 0, 0, {"mean_score": -math.inf, "epoch": None}
    metrics_path = out_dir / "metrics.jsonl"
    forward = dist.wrap(model, device)  # DistributedDataParallel under torchrun
    rs = RunState(model, optimizer, out_dir, schedule.state_dict(), args, forward, device)
    ema = rs.ema = extras.ema  # --ema: the averaged weights are the ones evaluated and kept as best
    rs.teacher, rs.surgery = extras.teacher, extras.surgery  # saved with `last` too
    if resume_dir is not None:
        state = read_state(resume_dir)
        if state.get("schedule") != schedule.state_dict():
            raise UsageError(f"cannot resume from {resume_dir}: its schedule {state.get('schedule')} "
                             f"differs from this run's {schedule.state_dict()} (same data, --limit, "
                             f"--schedule, --split-parts, --batch-size and --seed needed)")
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", map_location=device,
                                             weights_only=True))
        start_epoch, global_step = rs.load(state)
        best = rs.best
        if ema is not None and not ema.load(resume_dir, state.get("ema", {}).get("updates", 0)):
            print(f"--ema: {resume_dir} holds no averaged weights; the average restarts from the "
                  f"resumed weights", flush=True)
        if rs.teacher is not None and not rs.teacher.load(resume_dir, state.get("teacher", {}).get("updates", 0)):
            print(f"--smart-full-bregman: {resume_dir} holds no teacher weights; the teacher "
                  f"restarts from the resumed weights", flush=True)
        if rs.surgery is not None and state.get("surgery"):
            try:
                rs.surgery.load_state_dict(state["surgery"])
            except ValueError as e:
                raise UsageError(f"cannot resume from {resume_dir}: {e}") from None
        if "metrics" in state:  # the rows up to the checkpoint (a killed run may have written more)
            rows = state["metrics"]
        else:  # version 1 checkpoints
            rows = rs.metrics = [r for r in read_metrics(metrics_path) if r["epoch"] <= start_epoch]
        if main_rank:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            # a crash between saving `last` and copying it to `best`
            if (best["epoch"] == start_epoch and not state.get("next_step_in_epoch")
                    and (not is_complete(ck_dir / "best")
                         or read_state(ck_dir / "best").get("epochs_done") != start_epoch)):
                if ema is not None:
                    save_training_checkpoint(ck_dir / "best", ema.model, optimizer, state)
                else:
                    _copy_ck(resume_dir, ck_dir / "best")
        mid = state.get("next_step_in_epoch", 0)
        where = (f"epoch {start_epoch + 1} at step {mid}" if mid else f"after epoch {start_epoch}")
        print(f"resuming {where} (global step {global_step}, best mean_score "
              f"{best['mean_score']:.4f} at epoch {best['epoch']})", flush=True)
    elif main_rank:
        atomic_write_text(metrics_path, "")
    if main_rank:
        atomic_write_json(out_dir / "args.json", {**vars(args), "data_dir": str(data_dir),
                                                  "synthetic_data": synthetic, "split_parts_resolved": parts,
                                                  "world_size": dist.world()})
    print(f"setup {time.perf_counter() - t_setup:.1f}s; device {device}, precision {args.precision}, "
          f"backend {args.backend}, lr {args.lr:g}, smart {args.smart}"
          + (f" (sigma {args.smart_sigma}, lambda {args.smart_lambda})" if args.smart == "simple" else "")
          + f"; writing to {out_dir}", flush=True)

    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    best_in_memory = None  # (epoch, dev result) while the model in memory is the best one
    last_epoch = None
    spent = sum(r["train_seconds"] for r in rs.metrics)  # on every rank (rows are rank 0's)
    for epoch in (range(start_epoch, args.epochs) if args.epochs else itertools.count(start_epoch)):
        clock = TrainingClock(args.time_budget, spent)
        if clock.exhausted():
            break  # resumed after the budget was spent
        label = f"{epoch + 1}/{args.epochs}" if args.epochs else f"{epoch + 1}"
        stats, global_step = train_epoch(model, optimizer, schedule, train_data, epoch, args,
                                         device, global_step, label, synthetic, run_state=rs,
                                         extras=extras, clock=clock)
        last_epoch = epoch + 1
        spent += stats["train_seconds"]
        if not main_rank:  # rank 0 evaluates, writes and saves; the others wait
            rs.trainer_state(epoch + 1, 0, global_step)  # (collective: RNG states for the checkpoint)
            dist.barrier()
            if stats["budget_exhausted"]:
                break
            continue
        t_eval = time.perf_counter()
        eval_model = ema.model if ema is not None else model
        metrics, dev_preds = evaluate_dev(eval_model, dev_data, args.eval_batch_size, device, autocast_dtype)
        if ema is not None:  # the raw weights too, to see what the average adds
            raw, _ = evaluate_dev(model, dev_data, args.eval_batch_size, device, autocast_dtype)
            metrics.update({f"raw_{k}": raw[k] for k in ("sst_acc", "quora_acc", "sts_pearson", "mean_score")})
        eval_seconds = time.perf_counter() - t_eval
        is_best = metrics["mean_score"] > best["mean_score"]
        if is_best:
            best = {"mean_score": metrics["mean_score"], "epoch": epoch + 1}
        row = {"epoch": epoch + 1, **{k: v for k, v in metrics.items()}, **stats,
               "eval_seconds": eval_seconds, "global_step": global_step,
               "split_part": (epoch % parts) if args.schedule in ("split1", "split2") else None,
               "lr": args.lr, "smart": args.smart, "synthetic_data": synthetic, "best": is_best,
               "train_minutes_total": (clock.spent_before + stats["train_seconds"]) / 60.0,
               "recipe": args.recipe, "recipe_settings": recipe_settings}
        rs.best = best
        rs.metrics.append(row)
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rs.metrics))
        state = rs.trainer_state(epoch + 1, 0, global_step)
        last = save_training_checkpoint(ck_dir / "last", model, optimizer, state, ema, rs.teacher)
        dist.barrier()
        if is_best and ema is not None:
            save_training_checkpoint(ck_dir / "best", ema.model, optimizer, state)
        elif is_best:
            copy_checkpoint(last, ck_dir / "best")
            best_in_memory = (epoch + 1, (metrics, dev_preds))
        plot_learning_curves(read_metrics(metrics_path), out_dir / "plots", tag)
        losses = "  ".join(f"{t} {stats[f'train_loss_{t}']:.3f}" for t in TASK_ORDER
                           if stats[f"train_loss_{t}"] is not None)
        smart = f"  smart {stats['smart_term']:.4f}" if stats["smart_term"] is not None else ""
        raw = (f" | raw weights: mean {metrics['raw_mean_score']:.3f}" if ema is not None else "")
        print(f"epoch {label}{tag}: {stats['train_examples']} ex in {stats['train_seconds']:.1f}s "
              f"({stats['examples_per_second']:.1f} ex/s), loss {losses}{smart} | dev "
              f"{format_metrics(metrics)}{raw} (eval {eval_seconds:.1f}s){'  *best' if is_best else ''}",
              flush=True)
        if stats["budget_exhausted"]:
            print(f"time budget of {args.time_budget:g} min spent after {row['train_minutes_total']:.1f} "
                  f"min of training (epoch {epoch + 1}, global step {global_step})", flush=True)
            break

    if not main_rank:
        return 0
    # Predictions and confusion matrix from the best checkpoint.
    best_dir = ck_dir / "best"
    if not (best_dir / "model.safetensors").is_file():
        raise UsageError(f"no best checkpoint in {best_dir}")
    if best_in_memory is not None and best_in_memory[0] == last_epoch:  # the last epoch was best
        best_model, dev_result = (ema.model if ema is not None else model), best_in_memory[1]
    else:
        best_model = MultitaskBert.from_pretrained(best_dir, backend=args.backend).to(device)
        dev_result = None
    final = write_evaluation(best_model, tokenizer, data_dir, out_dir, args.eval_batch_size, device,
                             autocast_dtype, dev=dev_data, title_suffix=tag, dev_result=dev_result)
    print(f"best epoch {best['epoch']}{tag}: {format_metrics(final)}  sst_macro_f1 "
          f"{final['sst_macro_f1']:.3f}", flush=True)
    print(f"outputs: {metrics_path}, {best_dir}, {out_dir / 'predictions'}, {out_dir / 'plots'}", flush=True)
    return 0


def run_ensemble(args) -> int:
    """--ensemble K: the members, each a whole `run` of its own in OUT/memberI (seed + I - 1,
    budget / K), then their best checkpoints evaluated together (evaluate.Ensemble: raw outputs
    averaged) into OUT: dev_metrics.json, predictions/, plots/ and ensemble.json (the members'
    own dev metrics beside the ensemble's)."""
    from .data.tokenize import load_tokenizer
    from .evaluate import Ensemble, write_evaluation
    from .model import MultitaskBert
    from .report import atomic_write_json, format_metrics

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--ensemble trains its members one after another; run it without torchrun")
    k = args.ensemble
    out_dir = run_dir(args)
    members = []
    for i in range(k):
        member = argparse.Namespace(**vars(args))
        member.seed, member.out = args.seed + i, str(out_dir / f"member{i + 1}")
        if args.time_budget is not None:
            member.time_budget = args.time_budget / k
        budget = f", {member.time_budget:g} min of training" if args.time_budget is not None else ""
        print(f"== ensemble member {i + 1}/{k}: seed {member.seed}{budget}, in {member.out}", flush=True)
        rc = run(member)
        if rc:
            return rc
        members.append(Path(member.out))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _resolve_precision(args, device, verbose=False)  # the members said which
    data_dir, _, synthetic = resolve_data_dir(args.data_dir, out_dir)
    models = [MultitaskBert.from_pretrained(m / "checkpoints" / "best", backend=args.backend).to(device)
              for m in members]
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    tag = " [SYNTHETIC]" if synthetic else ""
    final = write_evaluation(Ensemble(models), load_tokenizer(args.pretrained, max_length=args.max_length),
                             data_dir, out_dir, args.eval_batch_size, device, autocast_dtype,
                             title_suffix=f" (ensemble of {k}){tag}")
    member_metrics = [json.loads((m / "dev_metrics.json").read_text()) for m in members]
    keys = ("sst_acc", "quora_acc", "sts_pearson", "mean_score")
    atomic_write_json(out_dir / "ensemble.json", {
        "members": [{"dir": str(m), "seed": args.seed + i, **{key: mm[key] for key in keys}}
                    for i, (m, mm) in enumerate(zip(members, member_metrics))],
        **{key: final[key] for key in keys}})
    for i, mm in enumerate(member_metrics):
        print(f"member {i + 1}{tag}: {format_metrics(mm)}", flush=True)
    print(f"ensemble of {k}{tag}: {format_metrics(final)}  sst_macro_f1 {final['sst_macro_f1']:.3f}",
          flush=True)
    print(f"outputs: {out_dir / 'dev_metrics.json'}, {out_dir / 'predictions'}, "
          f"{out_dir / 'ensemble.json'}", flush=True)
    return 0


def _resolve_precision(args, device, verbose: bool = True) -> None:
    """Replace --precision auto by fp32 or bf16 for `device` (smarter_fast.precision); say why."""
    args.precision_requested = getattr(args, "precision_requested", args.precision)
    args.precision, message = resolve_precision(args.precision_requested, device)
    if message and verbose:
        print(message, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .state import Stopped
    try:
        return run_ensemble(args) if args.ensemble > 1 else run(args)
    except Stopped as e:
        print(f"{e}", file=sys.stderr)
        return 128 + int(e.signum)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume --out DIR to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as e:  # clean one-liners for the errors a user can fix
        from .ops import BackendUnavailableError
        if isinstance(e, (BackendUnavailableError, FloatingPointError, FileNotFoundError,
                          ModuleNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        from .distributed import shutdown
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
