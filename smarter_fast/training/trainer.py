"""The Trainer: one epoch loop for every configuration.

    fit():  for each epoch:
                begin   fresh epoch: reseed torch from (seed, epoch), zero the epoch's sums;
                        a resumed mid-epoch position keeps the restored RNG and sums
                steps   TrainStep(item): gradients of the step shape (micro-batches under
                        --grad-accum-steps), non-finite check, clipping, LR schedule,
                        optimizer step, weight averages (SMART teacher, --ema)
                        after each: progress, step record (--report-to), --eval-every,
                        --save-every / stop request, time budget, --max-steps
                end     dev evaluation (sharded over ranks), metrics row, `last` checkpoint,
                        `best` (copy, or the EMA weights), plots

What varies is composed: the objective (smarter_fast.training.objectives: plain, SMART simple,
SMART full) and the step shape (smarter_fast.training.steps: one task's batch, or a
gradient-surgery group). Every stateful part is registered with the Checkpointer under a name;
`resume()` restores them all. See docs/design.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import distributed
from ..data.schedules import TASK_ORDER
from ..regularizers.ema import WeightEma
from ..optim.lr_schedule import LRSchedule, warmup_steps
from ..regularizers.smart import EmaTeacher, step_seed
from ..regularizers.surgery import GradientSurgery
from ..tasks import METRIC_KEYS
from .checkpoint import Checkpointer, copy_checkpoint, find_last_checkpoint, is_complete, read_state
from .components import (EpochTotals, NonFiniteGuard, Progress, RngState, RunRecord, ScheduleIdentity,
                         StopRequest, Stopped, TrainingClock)
from .objectives import build_objective
from .steps import SingleTaskSteps, SurgerySteps, TrainStep

log = logging.getLogger("smarter_fast")
EPOCH_SEED_SALT = 10_000_019  # dropout masks of epoch e: seeded by step_seed(seed, salt + e)


def build_lr_schedule(config, optimizer, n_steps_per_epoch) -> LRSchedule | None:
    """The LR schedule of a config (None: constant lr without warm-up). n_steps_per_epoch(e):
    the optimizer steps of epoch e. Under --time-budget it follows the fraction spent."""
    c = config
    total = None if c.epochs is None else sum(n_steps_per_epoch(e) for e in range(c.epochs))
    if c.max_steps is not None:  # training ends at whichever comes first
        total = c.max_steps if total is None else min(total, c.max_steps)
    if c.time_budget is not None:
        warm, fraction = (c.warmup_steps or 0), (0.0 if c.warmup_steps is not None else c.warmup_ratio)
    else:
        warm, fraction = warmup_steps(total, c.warmup_ratio, c.warmup_steps), 0.0
    if c.lr_schedule == "constant" and not warm and not fraction:
        return None
    return LRSchedule(optimizer, total, warm, c.lr_schedule, fraction)


class Trainer:
    """Trains `model` with `optimizer` on `train_data` by `schedule`, evaluating on `dev_data`
    after every epoch. `out_dir` None: nothing is written (no checkpoints, metrics or plots)."""

    def __init__(self, config, model, optimizer, schedule, train_data, dev_data, device, out_dir=None,
                 row_info: dict | None = None, synthetic: bool = False):
        c = self.config = config
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.train_data, self.dev_data, self.device = train_data, dev_data, torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.row_info, self.tag = dict(row_info or {}), " [SYNTHETIC]" if synthetic else ""
        self.autocast_dtype = torch.bfloat16 if c.precision == "bf16" else None
        self.surgery = (GradientSurgery(model, TASK_ORDER, c.grad_surgery, seed=c.seed)
                        if c.grad_surgery != "off" else None)
        per_epoch = ((lambda e: len(schedule.group_steps(e))) if self.surgery
                     else (lambda e: len(schedule.epoch_steps(e))))
        self.lr = build_lr_schedule(c, optimizer, per_epoch)
        self.teacher = EmaTeacher(model, c.smart_full_beta) if c.smart == "full" and c.smart_full_bregman else None
        self.ema = WeightEma(model, c.ema) if c.ema else None
        self.guard = NonFiniteGuard(c.max_nonfinite, hint=self._checkpoint_hint)
        self.stop = StopRequest()
        self.progress, self.record, self.rng = Progress(), RunRecord(), RngState()
        self.totals = EpochTotals(TASK_ORDER)
        self.forward = distributed.wrap(model, self.device)  # DDP under torchrun
        self.shape = self._step_shape()
        self.tracker = None  # --report-to: opened by fit() (on the main process, with an out_dir)
        self.step = TrainStep(model, optimizer, self.shape, self.guard, self.lr,
                              [a for a in (self.teacher, self.ema) if a is not None], self.stop, self.device,
                              max_grad_norm=c.max_grad_norm, need_grad_norm=bool(c.report_targets()))
        states = {"schedule": ScheduleIdentity(schedule), "optimizer": optimizer, "progress": self.progress,
                  "record": self.record, "nonfinite": self.guard,
                  "lr_schedule": self.lr, "ema": self.ema, "smart_teacher": self.teacher,
                  "surgery": self.surgery}
        self.checkpointer = Checkpointer(model, {k: v for k, v in states.items() if v is not None},
                                         rank_states={"rng": self.rng, "epoch_totals": self.totals},
                                         optional=("lr_schedule", "ema", "smart_teacher", "surgery"),
                                         max_seq_length=c.max_length)
        self.best_in_memory = None  # (global step, (metrics, dev predictions)) while the model is the best

    def _step_shape(self):
        c, symmetric = self.config, self.config.pair_order == "symmetric"
        objective = build_objective(c, self.teacher)
        autocast = self.autocast_dtype is not None
        micro = c.batch_size if c.grad_accum_steps > 1 else None  # the schedule's batches are K times larger
        if self.surgery is not None:
            return SurgerySteps(self.model, objective, self.device, self.schedule, self.train_data, c.seed,
                                symmetric, self.surgery, autocast, micro)
        return SingleTaskSteps(self.model, objective, self.device, self.schedule, self.train_data, c.seed,
                               symmetric, autocast, self.forward, micro)

    def describe(self) -> str:
        """The options in effect beyond the plain recipe (one line, empty when none)."""
        c, parts = self.config, []
        if c.smart == "full":
            parts.append(f"full SMART sigma {c.smart_full_sigma:g} eta {c.smart_full_eta:g} K {c.smart_full_steps} "
                         f"lambda {c.smart_full_lambda:g} "
                         + (f"epsilon-ball {c.smart_full_epsilon:g}" if c.smart_full_epsilon else "L-inf step")
                         + (" bregman" if self.teacher else ""))
        if self.lr is not None and c.time_budget is not None:
            warm = f"{self.lr.warmup} steps" if self.lr.warmup else f"{self.lr.warmup_fraction:g} of the budget"
            parts.append(f"lr {self.lr.kind} to the end of the time budget, warm-up {warm}")
        elif self.lr is not None:
            parts.append(f"lr {self.lr.kind}, warm-up {self.lr.warmup} of {self.lr.total} steps")
        if c.layer_decay != 1.0:
            parts.append(f"layer decay {c.layer_decay:g}")
        if self.surgery:
            parts.append(f"gradient surgery {c.grad_surgery}")
        if self.ema is not None:
            parts.append(f"weight EMA decay {self.ema.decay:g} (evaluated and kept as best)")
        if c.grad_accum_steps > 1:
            parts.append(f"gradient accumulation {c.grad_accum_steps} x {c.batch_size} = batch "
                         f"{c.grad_accum_steps * c.batch_size}{' per process' if distributed.world() > 1 else ''}")
        if c.max_grad_norm is not None:
            parts.append(f"gradient norm clipped to {c.max_grad_norm:g}")
        if c.max_steps is not None:
            parts.append(f"at most {c.max_steps} optimizer steps")
        if c.eval_every is not None:
            parts.append(f"dev evaluation every {c.eval_every} steps")
        if c.report_targets():
            parts.append(f"step records to {', '.join(c.report_targets())}")
        return "; ".join(parts)

    # -- checkpoints --------------------------------------------------------------------------------
    @property
    def ck_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def _checkpoint_hint(self) -> str:
        if self.out_dir is not None and find_last_checkpoint(self.out_dir):
            return f"The last good checkpoint is in {self.ck_dir / 'last'}. "
        return ""

    def summary(self) -> dict:
        """trainer_state.json: what a person or a tool reads of a checkpoint."""
        p = self.progress
        return {"epochs_done": p.epoch, "next_step_in_epoch": p.position, "global_step": p.global_step,
                "best": self.record.best, "metrics": self.record.rows, "schedule": self.schedule.state_dict(),
                "nonfinite": self.guard.state_dict(), "world_size": distributed.world(), "seed": self.config.seed,
                **({"ema": {"decay": self.ema.decay, "updates": self.ema.updates}} if self.ema else {}),
                "args": self.config.to_dict()}

    def save(self, name: str = "last", model=None) -> Path:
        return self.checkpointer.save(self.ck_dir / name, self.summary(), model=model)

    def resume(self, directory) -> None:
        """Restore every component from a checkpoint (the model's weights were loaded from it)."""
        self.checkpointer.load(directory, self.device)
        p, best = self.progress, self.record.best
        self._write_rows()
        # a crash between saving `last` and copying it to `best` (rank 0 looks; saving is collective)
        best_dir = self.ck_dir / "best"
        redo = distributed.broadcast_object(
            distributed.is_main() and best["epoch"] == p.epoch and not p.position
            and (not is_complete(best_dir) or read_state(best_dir).get("epochs_done") != p.epoch))
        if redo and self.ema is not None:
            self.save("best", model=self.ema.model)
        elif redo and distributed.is_main():
            copy_checkpoint(directory, best_dir)
        where = f"epoch {p.epoch + 1} at step {p.position}" if p.position else f"after epoch {p.epoch}"
        print(f"resuming {where} (global step {p.global_step}, best mean_score "
              f"{best['mean_score']:.4f} at epoch {best['epoch']})", flush=True)

    def _write_rows(self) -> None:
        if self.out_dir is not None and distributed.is_main():
            from ..report import atomic_write_text
            atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.record.rows))

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> int | None:
        """Train until --epochs, --time-budget or --max-steps ends it; returns the last epoch
        trained (1-based)."""
        c = self.config
        spent = self.record.train_seconds()  # on every rank (every rank keeps the rows)
        last_epoch = None
        epochs = range(self.progress.epoch, c.epochs) if c.epochs else itertools.count(self.progress.epoch)
        self._open_tracker()
        try:
            for epoch in epochs:
                clock = TrainingClock(c.time_budget, spent)
                if clock.exhausted() or self.steps_done():
                    break  # resumed after the budget or the steps were spent
                stats = self.train_epoch(epoch, clock)
                spent += stats["train_seconds"]
                last_epoch = epoch + 1
                self.end_epoch(epoch, stats, clock)
                if stats["budget_exhausted"] or self.steps_done():
                    break
        finally:
            if self.tracker is not None:
                self.tracker.close()
        return last_epoch

    def steps_done(self) -> bool:
        """--max-steps reached."""
        return self.config.max_steps is not None and self.progress.global_step >= self.config.max_steps

    def _open_tracker(self) -> None:
        targets = self.config.report_targets()
        if targets and self.out_dir is not None and distributed.is_main() and self.tracker is None:
            from .tracking import Tracker, lr_group_names
            resumed = self.progress.global_step if (self.progress.global_step or self.record.rows) else None
            self.tracker = Tracker(self.out_dir, targets, lr_group_names(self.optimizer), resumed)

    def applied_lr(self) -> float:
        """The learning rate of the heads' parameter group (the last one: groups go by depth)."""
        return float(self.optimizer.param_groups[-1]["lr"])

    def epoch_label(self, epoch: int) -> str:
        return f"{epoch + 1}/{self.config.epochs}" if self.config.epochs else f"{epoch + 1}"

    def _begin_epoch(self, epoch: int) -> int:
        """The first step position of `epoch`: a fresh epoch reseeds torch (the dropout masks are
        fixed per (seed, epoch)) and zeroes the sums; a resumed one keeps the restored ones."""
        p = self.progress
        if p.position and p.epoch == epoch:
            return p.position
        p.epoch, p.position = epoch, 0
        self.totals.reset()
        torch.manual_seed(step_seed(self.config.seed, EPOCH_SEED_SALT + epoch))
        return 0

    def train_epoch(self, epoch: int, clock: TrainingClock) -> dict:
        """One epoch (from a resumed position); returns its statistics."""
        items = self.shape.epoch_items(epoch)
        label = self.epoch_label(epoch)
        self.model.train()
        start = self._begin_epoch(epoch)
        totals, before, t0 = self.totals, self.totals.seconds, time.perf_counter()
        bar = self._progress_bar(epoch, items, start)
        exhausted, running = False, None
        try:
            with self.stop:
                for position in range(start, len(items)):
                    gs = self.progress.global_step
                    where = f"epoch {label}, step {position + 1}/{len(items)} (global step {gs + 1}, {self.shape.where(items[position])})"
                    t_step = time.perf_counter()
                    skip, result = self.step(items[position], gs, where,
                                             lambda: before + time.perf_counter() - t0, clock.progress)
                    if not skip:
                        running = self._add(result, running)
                    self.progress.global_step, self.progress.position = gs + 1, position + 1
                    totals.seconds = before + time.perf_counter() - t0
                    self._show(bar, result, running, totals.seconds)
                    if self.tracker is not None:
                        self._record_step(epoch, position + 1, len(items), result, skip,
                                          time.perf_counter() - t_step)
                    self._evaluate_mid_epoch(epoch, position + 1, len(items))
                    self._after_step(position + 1, len(items))
                    if clock.agreed_exhausted(totals.seconds) or self.steps_done():
                        exhausted = not self.steps_done()
                        break
        finally:
            bar.close()
        return self._epoch_stats(len(items), before + time.perf_counter() - t0, exhausted)

    def _add(self, result, running):
        for task, (loss, n, term) in result.values.items():
            value = float(loss)
            self.totals.add(task, value, n, None if term is None else float(term))
            running = value if running is None else 0.98 * running + 0.02 * value
        self.shape.applied(self.totals)
        return running

    def _record_step(self, epoch, position, n_steps, result, skipped, seconds) -> None:
        """One row of the step records (--report-to)."""
        record = {"step": self.progress.global_step, "epoch": round(epoch + position / n_steps, 6),
                  "task": "+".join(result.values), "grad_norm": self.step.grad_norm, "skipped": skipped,
                  "examples_per_second": result.examples / seconds if seconds > 0 else None,
                  "lr": self.applied_lr()}
        for name, group in zip(self.tracker.lr_names, self.optimizer.param_groups):
            record[name] = float(group["lr"])
        terms = []
        for task, (loss, _, term) in result.values.items():
            record[f"loss_{task}"] = float(loss)
            if term is not None:
                terms.append(float(term))
        record["smart_term"] = sum(terms) / len(terms) if terms else None
        self.tracker.step(record)

    def _progress_bar(self, epoch, items, start):
        from tqdm import tqdm
        sizes = [self.shape.examples(item) for item in items]
        return tqdm(total=sum(sizes), initial=sum(sizes[:start]), disable=not distributed.is_main(),
                    desc=f"epoch {self.epoch_label(epoch)}{self.tag}", unit="ex", dynamic_ncols=True,
                    mininterval=1.0, leave=False, file=sys.stderr)

    def _show(self, bar, result, running, seconds) -> None:
        bar.update(result.examples)
        if running is not None and not bar.disable:
            task = next(iter(result.values))
            rate = self.totals.seen * distributed.world() / max(seconds, 1e-9)
            bar.set_postfix_str(f"{task} loss {running:.3f}, {rate:.1f} ex/s", refresh=False)

    def _after_step(self, position: int, n_steps: int) -> None:
        """A mid-epoch checkpoint every --save-every steps; on a stop request, save and raise Stopped."""
        every = self.config.save_every
        periodic = every and self.progress.global_step % every == 0 and position < n_steps
        if not (self.step.stop_now or periodic) or self.out_dir is None:
            return
        last = self.save("last")
        if self.step.stop_now:
            raise Stopped(self.stop.signum or 2, last)

    def _epoch_stats(self, n_steps: int, seconds: float, exhausted: bool) -> dict:
        seconds = distributed.all_reduce_max([seconds])[0]  # the slowest rank's
        t = self.totals.reduced()
        return {"train_seconds": seconds, "train_examples": t.seen,
                "examples_per_second": t.seen / seconds if seconds > 0 else 0.0, "steps": n_steps,
                **{f"train_examples_{k}": t.counts[k] for k in TASK_ORDER},
                **t.mean_losses(),
                "nonfinite_skipped": self.guard.total, **self.shape.extra_stats(t),
                "budget_exhausted": exhausted}

    # -- evaluation and the end of an epoch -------------------------------------------------------------
    def evaluate(self) -> tuple[dict, dict, float]:
        """(dev metrics, dev predictions, seconds): every rank evaluates its share of the batches."""
        from ..evaluation import evaluate_dev
        t0 = time.perf_counter()
        eval_model = self.ema.model if self.ema is not None else self.model
        args = (self.config.eval_batch_size, self.device, self.autocast_dtype)
        metrics, preds = evaluate_dev(eval_model, self.dev_data, *args, shard=distributed)
        if self.ema is not None:  # the raw weights too, to see what the average adds
            raw, _ = evaluate_dev(self.model, self.dev_data, *args, shard=distributed)
            metrics.update({f"raw_{k}": raw[k] for k in (*METRIC_KEYS, "mean_score")})
        return metrics, preds, time.perf_counter() - t0

    def end_epoch(self, epoch: int, stats: dict, clock: TrainingClock) -> None:
        c, record = self.config, self.record
        metrics, dev_preds, eval_seconds = self.evaluate()
        is_best = self._is_best(metrics, epoch)
        split = c.schedule in ("split1", "split2")
        row = {"epoch": epoch + 1, **({"step": self.progress.global_step, "epoch_end": True} if c.eval_every else {}),
               **metrics, **stats, "eval_seconds": eval_seconds,
               "global_step": self.progress.global_step,
               "split_part": (epoch % self.schedule.parts) if split else None, "lr": self.applied_lr(),
               "smart": c.smart, "synthetic_data": bool(self.tag), "best": is_best,
               "train_minutes_total": (clock.spent_before + stats["train_seconds"]) / 60.0, **self.row_info}
        record.rows.append(row)
        self._track_evaluation(row)
        self.progress.epoch, self.progress.position = epoch + 1, 0
        if self.out_dir is None:
            return
        self._write_rows()
        last = self.save("last")
        self._keep_best(is_best, last, metrics, dev_preds)
        if distributed.is_main():
            self._report_epoch(epoch, row, stats, metrics, is_best)

    def _is_best(self, metrics: dict, epoch: int) -> bool:
        record = self.record
        is_best = metrics["mean_score"] > record.best["mean_score"]
        if is_best:
            record.best = {"mean_score": metrics["mean_score"], "epoch": epoch + 1,
                           **({"step": self.progress.global_step} if self.config.eval_every else {})}
        return is_best

    def _keep_best(self, is_best: bool, last, metrics, dev_preds) -> None:
        """After `last` was saved: a new best becomes checkpoints/best (the EMA weights with --ema)."""
        if is_best and self.ema is not None:
            self.save("best", model=self.ema.model)
        elif is_best:
            if distributed.is_main():
                copy_checkpoint(last, self.ck_dir / "best")
            self.best_in_memory = (self.progress.global_step, (metrics, dev_preds))

    def _track_evaluation(self, row: dict) -> None:
        if self.tracker is not None:
            self.tracker.evaluation({**row, "step": self.progress.global_step})

    def _evaluate_mid_epoch(self, epoch: int, position: int, n_steps: int) -> None:
        """--eval-every: a dev evaluation and a metrics row every N optimizer steps (the epoch's
        last step is left to end_epoch); a new best is saved at once (`last`, then `best`)."""
        c, gs = self.config, self.progress.global_step
        if not c.eval_every or gs % c.eval_every or position >= n_steps or self.steps_done():
            return
        metrics, dev_preds, eval_seconds = self.evaluate()
        self.model.train()
        is_best = self._is_best(metrics, epoch)
        t = self.totals.reduced()
        row = {"epoch": epoch + 1, "step": gs, "epoch_end": False, **metrics,
               "train_examples": t.seen,
               **t.mean_losses(),
               "eval_seconds": eval_seconds, "global_step": gs, "lr": self.applied_lr(), "smart": c.smart,
               "synthetic_data": bool(self.tag), "best": is_best, **self.row_info}
        self.record.rows.append(row)
        self._track_evaluation(row)
        if self.out_dir is None:
            return
        self._write_rows()
        if is_best:
            self._keep_best(True, self.save("last"), metrics, dev_preds)
        if distributed.is_main():
            from ..report import format_metrics
            print(f"step {gs} (epoch {self.epoch_label(epoch)}, {position}/{n_steps}){self.tag}: dev "
                  f"{format_metrics(metrics)} (eval {eval_seconds:.1f}s){'  *best' if is_best else ''}", flush=True)

    def _report_epoch(self, epoch, row, stats, metrics, is_best) -> None:
        from ..report import format_metrics, plot_learning_curves
        plot_learning_curves(self.record.rows, self.out_dir / "plots", self.tag)
        losses = "  ".join(f"{t} {stats[f'train_loss_{t}']:.3f}" for t in TASK_ORDER
                           if stats[f"train_loss_{t}"] is not None)
        smart = f"  smart {stats['smart_term']:.4f}" if stats["smart_term"] is not None else ""
        raw = f" | raw weights: mean {metrics['raw_mean_score']:.3f}" if self.ema is not None else ""
        print(f"epoch {self.epoch_label(epoch)}{self.tag}: {stats['train_examples']} ex in {stats['train_seconds']:.1f}s "
              f"({stats['examples_per_second']:.1f} ex/s), loss {losses}{smart} | dev "
              f"{format_metrics(metrics)}{raw} (eval {row['eval_seconds']:.1f}s){'  *best' if is_best else ''}",
              flush=True)
        if self.steps_done():
            print(f"--max-steps {self.config.max_steps} reached (epoch {epoch + 1}, global step "
                  f"{self.progress.global_step})", flush=True)
        if stats["budget_exhausted"]:
            print(f"time budget of {self.config.time_budget:g} min spent after {row['train_minutes_total']:.1f} "
                  f"min of training (epoch {epoch + 1}, global step {self.progress.global_step})", flush=True)


__all__ = ["EPOCH_SEED_SALT", "Trainer", "build_lr_schedule"]
