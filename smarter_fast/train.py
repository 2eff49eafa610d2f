"""Multi-task fine-tuning of BERT on SST, Quora and STS, with optional SMART ("SMARTer BERT").

    python -m smarter_fast.train [--data-dir DIR] [--epochs 10] [--schedule split1] ...

The command line: flags (defaults < --recipe < --config FILE < explicit flags; on --resume the run's
config.toml: training.layers) become a TrainConfig (training.config), and training.run trains it.
With no --data-dir: ./data when it holds the CS224N files, else the built-in SYNTHETIC demo data.
Defaults follow the report's best recipe: split1, no SMART, dropout 0, lr 1e-5, batch 8, 10 epochs.
What a run writes: smarter_fast.training.run; the engine: docs/design.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU spinning threads make
# torch several times slower; set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Transparent huge pages for torch's large CPU buffers (the flat optimizer buffers, the word
# embedding's gradient): they fault in 2 MiB pages instead of 4 KiB ones, much faster. Read by
# torch once, at its first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .data.schedules import SCHEDULES
from .optim.lr_schedule import LR_SCHEDULES
from .precision import PRECISIONS
from .training.recipes import recipe_arg, recipe_help
from .regularizers.smart import SMART_MODES
from .regularizers.surgery import SURGERIES
from .training.arguments import (HelpFormatter as _HelpFormatter, add_tracking_args as _tracking_args,
                                 add_trainer_args as _trainer_args, float_arg as _float,
                                 positive_int as _positive_int, split_parts_arg as _split_parts)
from .training.config import DEFAULT_EPOCHS, ConfigError, TrainConfig
from .training.layers import ConfigFileError, parse_layers, resume_help
from .training.run import DEMO_LR, REPORT_LR, UsageError, run, run_ensemble

log = logging.getLogger("smarter_fast")


# ---- arguments -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smarter_fast.train",
        description="Multi-task fine-tuning of BERT on SST, Quora and STS (CS224N minBERT), "
                    "with the schedules and SMART regularisation of 'SMARTer BERT'.",
        formatter_class=_HelpFormatter)
    for add in (_data_args, _training_args, _trainer_args, _smart_args, _full_smart_args, _lr_and_surgery_args,
                _run_args, _tracking_args):
        add(p)
    return p


def _data_args(p) -> None:
    """Data and model flags."""
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
    d.add_argument("--strict", action="store_true",
                   help="malformed data rows are errors (file, line, field) instead of skipped")


def _training_args(p) -> None:
    """Training flags."""
    t = p.add_argument_group("training")
    t.add_argument("--config", metavar="FILE.toml", default=None,
                   help="TOML file of training options, keys named as the flags (batch_size = 16 or "
                        "batch-size = 16; recipe = NAME picks the recipe under it); it overrides the "
                        "recipe and explicit flags override it; a run's OUT/config.toml repeats that "
                        "run (default: none)")
    t.add_argument("--recipe", type=recipe_arg, default="report", metavar="NAME|FILE.toml",
                   help=f"preset of the training options: {recipe_help()}; or a TOML file of your "
                        f"own, keys as in --config; --config and explicit flags override it "
                        f"(default: report)")
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


def _smart_args(p) -> None:
    """Simple SMART flags."""
    s = p.add_argument_group("SMART")
    s.add_argument("--smart", choices=SMART_MODES, default="off",
                   help="simple: the report's Algorithm 1 (noise on the embeddings); "
                        "full: adversarial SMART (Jiang et al.; --smart-full-* flags)")
    s.add_argument("--smart-sigma", type=_float("--smart-sigma", 0.0), default=0.05,
                   help="standard deviation of the embedding noise")
    s.add_argument("--smart-lambda", type=_float("--smart-lambda", 0.0), default=10.0,
                   help="weight of the SMART term")


def _run_args(p) -> None:
    """Run flags (backend, precision, seeds, checkpoints)."""
    r = p.add_argument_group("run")
    r.add_argument("--backend", choices=("auto", "ref", "cpp", "triton"), default=None,
                   help="kernels for attention, AdamW and SMART (default: $SMARTER_FAST_BACKEND or auto)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when torch sees one, else the CPU (under torchrun: each rank's)")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast with fp32 master weights; auto: bf16 where the device runs it "
                        "natively (GPUs with bf16, CPUs with AVX512-BF16 or AMX), else fp32")
    r.add_argument("--seed", type=int, default=11711,
                   help="seed for shuffling, dropout, noise and initialisation")
    r.add_argument("--out", default=None, help="output directory (default: runs/<date-time>/)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (start afresh if there is none) "
                        + resume_help())
    r.add_argument("--save-every", type=_positive_int("--save-every"), default=None,
                   help="also checkpoint (checkpoints/last) every N training steps, mid-epoch "
                        "included (default: at epoch ends only)")
    r.add_argument("--max-nonfinite", type=_positive_int("--max-nonfinite"), default=5,
                   help="steps with a NaN/inf loss or gradient are skipped; stop after this many in a row")
    r.add_argument("--num-threads", type=_positive_int("--num-threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")


def _full_smart_args(p) -> None:
    """Full SMART flags (--smart full; Jiang et al. 2019, as in mt-dnn)."""
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


def _lr_and_surgery_args(p) -> None:
    """Learning-rate schedule, layer-wise decay and gradient surgery flags."""
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


def parse_args(argv=None) -> argparse.Namespace:
    """The flags over the --config file over the recipe over the defaults, checked; on --resume
    over the run's config.toml (training.layers: raises its ResumeConflict)."""
    p = build_parser()
    try:
        args = parse_layers(p, argv)
    except ConfigFileError as e:
        p.error(str(e))
    if args.epochs is None and args.time_budget is None and args.max_steps is None:
        args.epochs = DEFAULT_EPOCHS
    if args.backend is None:
        args.backend = os.environ.get("SMARTER_FAST_BACKEND", "auto") or "auto"
        if args.backend not in ("auto", "ref", "cpp", "triton"):
            p.error(f"SMARTER_FAST_BACKEND={args.backend!r}: expected auto, ref, cpp or triton")
    config = TrainConfig.from_namespace(args)
    try:
        config.validate()
    except ConfigError as e:
        p.error(str(e))
    for warning in config.warnings():
        log.warning(warning)
    if args.pretrained is not None and not Path(args.pretrained).is_dir():
        p.error(f"--pretrained {args.pretrained}: directory not found (expected a Hugging Face "
                f"BERT directory with config.json, model.safetensors and vocab.txt)")
    if args.pretrained is not None:
        from .model.checkpoint import check_pretrained_dir
        problem = check_pretrained_dir(args.pretrained)
        if problem:
            p.error(problem)
    return args


def config_from_args(argv=None) -> TrainConfig:
    """The TrainConfig of a command line (parse_args, then typed)."""
    return TrainConfig.from_namespace(parse_args(argv))


def main(argv=None) -> int:
    from .training.components import Stopped
    try:
        config = config_from_args(argv)
        return run_ensemble(config) if config.ensemble > 1 else run(config)
    except Stopped as e:
        print(f"{e}", file=sys.stderr)
        return 128 + int(e.signum)
    except (UsageError, ConfigError) as e:  # ConfigError: training.layers.ResumeConflict
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
        from .training.distributed import shutdown
        shutdown()


__all__ = ["DEFAULT_EPOCHS", "UsageError", "build_parser", "config_from_args", "main", "parse_args"]


if __name__ == "__main__":
    sys.exit(main())
