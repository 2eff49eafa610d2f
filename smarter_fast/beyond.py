"""Wiring of the "beyond the report" options into `python -m smarter_fast.train`.

- `add_args(parser)` / `check_args(args, error)`: the flags of full SMART, the LR schedules,
  layer-wise LR decay and gradient surgery (the samplers are `--schedule` values).
- `Extras` (built once per run): the optimizer's parameter groups (layer-wise decay), the LR
  schedule (`before_step`), the EMA teacher of the Bregman proximal point (`after_step`), the loss
  of a batch under --smart off | simple | full (`step_loss`) and the gradient-surgery epoch
  (`surgery_epoch`: one batch of every task per step, see smarter_fast.surgery and the schedules'
  `group_steps`).

Checkpoints keep the EMA teacher's weights (smart_teacher.safetensors) and the surgery's state
(GradVac's target similarities, the pair-order generator) in trainer_state.json, so --resume
continues exactly; the LR schedule is a pure function of the global step.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from .data.schedules import TASK_ORDER
from .ema import WeightEma
from .losses import task_loss
from .lr_schedule import LR_SCHEDULES, LRSchedule, param_groups, warmup_steps
from .smart import EmaTeacher, smart_full_loss, smart_simple_loss, step_seed, task_forward
from .surgery import SURGERIES, GradientSurgery


def add_args(p) -> None:
    s = p.add_argument_group("full SMART (--smart full; Jiang et al. 2019, as in mt-dnn)")
    s.add_argument("--smart-full-sigma", type=float, default=1e-5,
                   help="std of the initial random perturbation of the embedding output")
    s.add_argument("--smart-full-eta", type=float, default=1e-3, help="ascent step size")
    s.add_argument("--smart-full-steps", type=int, default=1, help="ascent steps K")
    s.add_argument("--smart-full-lambda", type=float, default=1.0, help="weight of the adversarial term")
    s.add_argument("--smart-full-epsilon", type=float, default=None,
                   help="project the perturbation onto the L-inf ball of this radius (the paper's "
                        "projected ascent, e.g. 1e-5); default: mt-dnn's per-token L-inf normalised step")
    s.add_argument("--smart-full-keep-dropout", action="store_true",
                   help="keep dropout on in the adversarial passes (default: off)")
    s.add_argument("--smart-full-bregman", action="store_true",
                   help="add the momentum Bregman proximal point term (EMA teacher)")
    s.add_argument("--smart-full-beta", type=float, default=0.995, help="EMA rate of the teacher")
    s.add_argument("--smart-full-mu", type=float, default=1.0, help="weight of the Bregman term")
    o = p.add_argument_group("learning-rate schedule and gradient surgery")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="after the warm-up: constant, linear decay to 0 or cosine decay to 0")
    o.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="linear warm-up over this fraction of all training steps")
    o.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps (overrides the ratio)")
    o.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise LR decay: layer i of n gets lr * decay^(n - i), embeddings "
                        "decay^(n + 1), heads lr")
    o.add_argument("--grad-surgery", choices=SURGERIES, default="off",
                   help="pcgrad | gradvac on the shared encoder (heads excluded); every step then "
                        "takes one batch of every task")


def check_args(args, error) -> None:
    if args.smart_full_sigma < 0 or args.smart_full_eta <= 0 or args.smart_full_lambda < 0:
        error("--smart-full-sigma/-lambda must be >= 0 and --smart-full-eta > 0")
    if args.smart_full_steps < 1:
        error(f"--smart-full-steps must be >= 1, got {args.smart_full_steps}")
    if args.smart_full_epsilon is not None and args.smart_full_epsilon <= 0:
        error("--smart-full-epsilon must be > 0")
    if not 0 <= args.smart_full_beta < 1 or args.smart_full_mu < 0:
        error("--smart-full-beta must be in [0, 1) and --smart-full-mu >= 0")
    if not 0 <= args.warmup_ratio < 1:
        error(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        error("--warmup-steps must be >= 0")
    if not 0 < args.layer_decay <= 1:
        error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.grad_surgery != "off" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        error("--grad-surgery runs in one process (its steps are not sharded over ranks); "
              "run it without torchrun")


def optimizer_params(model, args):
    """Parameters (or groups, with --layer-decay < 1) for the optimizer."""
    if getattr(args, "layer_decay", 1.0) == 1.0:
        return model.parameters()
    return param_groups(model, args.lr, args.layer_decay, args.weight_decay)


class Extras:
    def __init__(self, args, model, optimizer, schedule):
        self.args = args
        self.surgery = (GradientSurgery(model, TASK_ORDER, args.grad_surgery, seed=args.seed)
                        if getattr(args, "grad_surgery", "off") != "off" else None)
        kind = getattr(args, "lr_schedule", "constant")
        ratio, fixed = getattr(args, "warmup_ratio", 0.0), getattr(args, "warmup_steps", None)
        self.budgeted = getattr(args, "time_budget", None) is not None
        if args.epochs is None:  # --time-budget alone: the number of steps is unknown
            self.total_steps = None
        else:
            self.total_steps = sum(len(schedule.group_steps(e)) if self.surgery else len(schedule.epoch_steps(e))
                                   for e in range(args.epochs))
        if self.budgeted:  # the schedule follows the fraction of the budget spent (lr_schedule)
            warm, warm_fraction = (fixed or 0), (0.0 if fixed is not None else ratio)
        else:
            warm, warm_fraction = warmup_steps(self.total_steps, ratio, fixed), 0.0
        self.lr = (LRSchedule(optimizer, self.total_steps, warm, kind, warm_fraction)
                   if (kind != "constant" or warm or warm_fraction) else None)
        self.teacher = (EmaTeacher(model, args.smart_full_beta)
                        if args.smart == "full" and getattr(args, "smart_full_bregman", False) else None)
        self.ema = WeightEma(model, args.ema) if getattr(args, "ema", 0.0) else None

    def describe(self) -> str:
        a = self.args
        parts = []
        if a.smart == "full":
            parts.append(f"full SMART sigma {a.smart_full_sigma:g} eta {a.smart_full_eta:g} K {a.smart_full_steps} "
                         f"lambda {a.smart_full_lambda:g} "
                         + (f"epsilon-ball {a.smart_full_epsilon:g}" if a.smart_full_epsilon else "L-inf step")
                         + (" bregman" if self.teacher else ""))
        if self.lr is not None and self.budgeted:
            warm = (f"{self.lr.warmup} steps" if self.lr.warmup
                    else f"{self.lr.warmup_fraction:g} of the budget")
            parts.append(f"lr {self.lr.kind} to the end of the time budget, warm-up {warm}")
        elif self.lr is not None:
            parts.append(f"lr {self.lr.kind}, warm-up {self.lr.warmup} of {self.total_steps} steps")
        if a.layer_decay != 1.0:
            parts.append(f"layer decay {a.layer_decay:g}")
        if self.surgery:
            parts.append(f"gradient surgery {a.grad_surgery}")
        if self.ema is not None:
            parts.append(f"weight EMA decay {self.ema.decay:g} (evaluated and kept as best)")
        return "; ".join(parts)

    # -- per step ------------------------------------------------------------------------------
    def before_step(self, global_step: int, progress: float | None = None) -> None:
        """progress: fraction of the --time-budget spent (None without a budget)."""
        if self.lr is not None:
            self.lr.apply(global_step, progress if self.budgeted else None)

    def after_step(self, model) -> None:
        if self.teacher is not None:
            self.teacher.update(model)
        if self.ema is not None:
            self.ema.update(model)

    def step_loss(self, model, task, batch, global_step):
        """(total, task loss, SMART term or None) of one batch under the run's --smart."""
        a = self.args
        if a.smart == "simple":
            total, loss, term, _ = smart_simple_loss(model, task, batch, a.smart_sigma, a.smart_lambda,
                                                     step_seed(a.seed, global_step), backend=a.backend,
                                                     label_smoothing=a.label_smoothing)
        elif a.smart == "full":
            total, loss, term, _ = smart_full_loss(
                model, task, batch, sigma=a.smart_full_sigma, eta=a.smart_full_eta,
                steps=a.smart_full_steps, lam=a.smart_full_lambda, epsilon=a.smart_full_epsilon,
                keep_dropout=a.smart_full_keep_dropout, seed=step_seed(a.seed, global_step),
                teacher=self.teacher, mu=a.smart_full_mu, label_smoothing=a.label_smoothing)
        else:
            out = task_forward(model, task, batch)
            loss = task_loss(task, out, batch["labels"], label_smoothing=a.label_smoothing)
            total, term = loss, None
        return total, loss, term

    # -- gradient surgery epoch -----------------------------------------------------------------
    def surgery_epoch(self, model, optimizer, schedule, train_data, epoch, args, device, global_step,
                      epoch_label, synthetic, to_device, clock=None, run_state=None):
        """One epoch of gradient-surgery steps; returns (stats, global_step) like train_epoch
        (`clock`: the run's TrainingClock for --time-budget, or None). With a `run_state`
        (smarter_fast.state.RunState), as train_epoch: the epoch may start mid-way (resume), a
        step with a non-finite loss or gradient is skipped (--max-nonfinite in a row stop the
        run), and checkpoints are written every --save-every steps and on SIGINT/SIGTERM."""
        from tqdm import tqdm
        from .state import RunState
        from .train import pair_swaps
        rs = run_state if run_state is not None else RunState(model, optimizer, args=args)
        groups = schedule.group_steps(epoch)
        exhausted = False
        autocast = args.precision == "bf16"
        model.train()
        start, partial = rs.begin_epoch(epoch, lambda: step_seed(args.seed, 10_000_019 + epoch))
        p = partial or {"sums": {t: 0.0 for t in TASK_ORDER}, "counts": {t: 0 for t in TASK_ORDER},
                        "smart_sum": 0.0, "smart_n": 0, "seen": 0, "seconds": 0.0,
                        "cos_sum": 0.0, "cos_n": 0}
        sums, counts = p["sums"], p["counts"]
        t0 = time.perf_counter()
        bar = tqdm(total=len(groups), initial=start, desc=f"epoch {epoch_label} ({args.grad_surgery})"
                   + (" [SYNTHETIC]" if synthetic else ""), unit="step", dynamic_ncols=True,
                   mininterval=1.0, leave=False, file=sys.stderr)
        try:
            with rs.stop:
                for gi in range(start, len(groups)):
                    group = groups[gi]
                    weights = schedule.task_weights(epoch, gi)
                    values, checks = {}, []
                    for task, indices in group.items():
                        batch = to_device(train_data[task].batch(
                            indices, swap=pair_swaps(args, task, global_step, len(indices))), device)
                        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                            total, loss, term = self.step_loss(model, task, batch, global_step)
                        (total * weights[task]).backward()  # one task's graph at a time
                        self.surgery.collect(task)
                        checks += [loss.detach(), total.detach()]
                        values[task] = (loss.detach(), len(indices), None if term is None else term.detach())
                    # a non-finite row gives a non-finite combination (and leaves GradVac alone)
                    self.surgery.combine(list(group))
                    skip = rs.check_step(checks, f"epoch {epoch_label}, step {gi + 1}/{len(groups)} "
                                                 f"(global step {global_step + 1}, {args.grad_surgery})")
                    if not skip:
                        c = self.surgery.last_cosines
                        if c is not None and c.shape[0] > 1:
                            p["cos_sum"] += float(c[~torch.eye(c.shape[0], dtype=torch.bool)].mean())
                            p["cos_n"] += 1
                        self.before_step(global_step, clock.progress(p["seconds"] + time.perf_counter() - t0)
                                         if clock else None)
                        optimizer.step()
                        self.after_step(model)
                        for task, (v, n, term) in values.items():
                            sums[task] += float(v) * n
                            counts[task] += n
                            if term is not None:
                                p["smart_sum"] += float(term) * n
                                p["smart_n"] += n
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    p["seen"] += sum(n for _, n, _ in values.values()) if not skip else 0
                    bar.update(1)
                    p_now = {**p, "seconds": p["seconds"] + time.perf_counter() - t0}
                    rs.after_step(epoch, gi + 1, len(groups), global_step, p_now)
                    if clock is not None and clock.exhausted(p_now["seconds"]):
                        exhausted = True
                        break
        finally:
            bar.close()
        seconds = p["seconds"] + time.perf_counter() - t0
        stats = {
            "train_seconds": seconds,
            "train_examples": p["seen"],
            "examples_per_second": p["seen"] / seconds if seconds > 0 else 0.0,
            "steps": len(groups),
            **{f"train_examples_{t}": counts[t] for t in TASK_ORDER},
            **{f"train_loss_{t}": (sums[t] / counts[t] if counts[t] else None) for t in TASK_ORDER},
            "smart_term": p["smart_sum"] / p["smart_n"] if p["smart_n"] else None,
            "nonfinite_skipped": rs.guard.total,
            "grad_surgery": args.grad_surgery,
            "task_grad_cosine": p["cos_sum"] / p["cos_n"] if p["cos_n"] else None,
            "budget_exhausted": exhausted,
        }
        return stats, global_step


__all__ = ["add_args", "check_args", "optimizer_params", "Extras"]
