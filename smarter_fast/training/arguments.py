"""Argument types and the flag groups of the training command that its parser shares
(`smarter_fast.train` builds the parser; these keep each flag's parsing and help in one place)."""

from __future__ import annotations

import argparse
import math


def positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def float_arg(name, low=None, high=None, low_open=False, high_open=False):
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


def split_parts_arg(text):
    if text == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split-parts must be 'auto' or a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--split-parts must be 'auto' or >= 1, got {v}")
    return v


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help does not already say it and there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not ==: 0 and 0.0 equal False but are defaults worth showing
        if "default" in text or any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def add_trainer_args(p) -> None:
    """Gradient, step and evaluation controls (each off by default: the report's recipe is unchanged)."""
    t = p.add_argument_group("steps, gradients and evaluation")
    t.add_argument("--max-grad-norm", type=float_arg("--max-grad-norm", 0.0, low_open=True), default=None,
                   metavar="NORM", help="clip the global gradient L2 norm to NORM before each optimizer step "
                                        "(default: off)")
    t.add_argument("--grad-accum-steps", type=positive_int("--grad-accum-steps"), default=1, metavar="K",
                   help="one optimizer step per K micro-batches of --batch-size: the same examples and "
                        "averaged gradient as --batch-size x K (LR schedules count optimizer steps)")
    t.add_argument("--max-steps", type=positive_int("--max-steps"), default=None, metavar="N",
                   help="stop after N optimizer steps, or at the end of --epochs / --time-budget if "
                        "that comes first; LR schedules span the shortest (default: no limit)")
    t.add_argument("--eval-every", type=positive_int("--eval-every"), default=None, metavar="N",
                   help="also evaluate on dev every N optimizer steps (metrics.jsonl rows then carry "
                        "`step`; the best checkpoint may come from any evaluation) (default: after "
                        "every epoch only)")
    t.add_argument("--encoder-dropout", type=float_arg("--encoder-dropout", 0.0, 1.0, high_open=True),
                   default=None, metavar="P",
                   help="the encoder's hidden and attention dropout (default: the checkpoint's, 0.1 "
                        "for BERT and MiniLM)")


def add_tracking_args(p) -> None:
    """Step-level tracking."""
    t = p.add_argument_group("tracking")
    t.add_argument("--report-to", default="none", metavar="LIST",
                   help="per-step tracking, a comma-separated list: csv (OUT/steps.csv and "
                        "OUT/evals.csv), tensorboard (OUT/tensorboard; needs the tensorboard "
                        "package), or none")


__all__ = ["HelpFormatter", "add_tracking_args", "add_trainer_args", "float_arg", "positive_int",
           "split_parts_arg"]
