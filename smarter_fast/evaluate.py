"""`python -m smarter_fast.evaluate --checkpoint DIR [DIR ...] --data-dir DIR [--out DIR]`: dev
metrics, the SST confusion matrix and CS224N leaderboard prediction files for a checkpoint (or
several, as one ensemble). `--task NAME --file FILE` scores one CS224N-format file instead. What is
computed and written: smarter_fast/evaluation.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU spinning threads make
# torch several times slower; set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from . import tasks as registry
from .data.cs224n import DataError
from .evaluation import CLASS_TASKS, evaluate_file, format_class_metrics, write_evaluation
from .inference import load
from .precision import DEVICES, PRECISIONS
from .report import format_metrics


# ---- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smarter_fast.evaluate", description=(
        "Evaluate a MultitaskBert checkpoint (or several, as one ensemble) on CS224N dev sets and "
        "write leaderboard predictions; or score one CS224N-format file of one task."))
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="DIR",
                   help="checkpoint directory (e.g. RUN/checkpoints/best); several: an ensemble whose "
                        "raw outputs are averaged (they must share pair_features and pair_order)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="CS224N data directory: every task's dev set, and the "
                                           "test-student files present")
    source.add_argument("--file", metavar="FILE",
                        help="one CS224N-format file of --task: metrics when it has labels, and its "
                             "prediction file")
    p.add_argument("--task", choices=registry.TASK_NAMES, default=None,
                   help="the task of --file (required with it)")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint directory; "
                                               "required for several)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: the GPU when torch sees one (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16: autocast; auto: bf16 where the device runs it natively (default: as "
                        "the checkpoint was trained, from its trainer_state.json, so the outputs are "
                        "the ones its run scored; fp32 where that was bf16 but the device lacks it)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncation length (default: the training run's, from trainer_state.json, else 128)")
    p.add_argument("--backend", choices=("auto", "ref", "cpp", "triton"), default="auto",
                   help="op backend (default: auto)")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_length is not None and not 8 <= args.max_length <= 512:  # as the trainer's
        p.error(f"--max-length must be in [8, 512] (BERT position embeddings), got {args.max_length}")
    if args.file and not args.task:
        p.error("--file needs --task (the file's task)")
    if args.task and not args.file:
        p.error("--task goes with --file (a data directory holds every task)")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    ckpts = [Path(c) for c in args.checkpoint]
    for ckpt in ckpts:
        if not ckpt.is_dir():
            print(f"error: checkpoint directory {ckpt} not found", file=sys.stderr)
            return 2
    if len(ckpts) > 1 and not args.out:
        p.error("--out is required with several checkpoints")
    out = Path(args.out) if args.out else ckpts[0]
    try:
        predictor = load(ckpts, device=args.device, precision=args.precision, backend=args.backend,
                         batch_size=args.batch_size, max_length=args.max_length)
        t0 = time.time()
        if args.file:
            metrics, written = evaluate_file(predictor.model, predictor.tokenizer, args.task, args.file,
                                             out, args.batch_size, predictor.device,
                                             predictor.autocast_dtype)
        else:
            metrics = write_evaluation(predictor.model, predictor.tokenizer, args.data_dir, out,
                                       args.batch_size, predictor.device, predictor.autocast_dtype)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"({predictor.device}, {predictor.precision}, {time.time() - t0:.1f}s)"
    if args.file:
        shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        print(f"{registry.task(args.task).title} {args.file}: {shown or 'no labels, no metrics'}  {where}")
        print(f"wrote {', '.join(str(f) for f in written)}")
        return 0
    print(f"dev: {format_metrics(metrics)}  {format_class_metrics(metrics)}  {where}")
    plots = [out / "plots" / f"{t.name}_confusion.png" for t in CLASS_TASKS]
    print(f"wrote {', '.join(str(f) for f in [out / 'predictions', out / 'dev_metrics.json', *plots])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
