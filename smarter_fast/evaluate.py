"""`python -m smarter_fast.evaluate --checkpoint DIR [DIR ...] --data-dir DIR [--out DIR]`: dev
metrics, the SST confusion matrix and CS224N leaderboard prediction files for a checkpoint (or
several, as one ensemble). What is computed and written: smarter_fast/evaluation.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU spinning threads make
# torch several times slower; set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from .data.cs224n import DataError
from .data.tokenize import load_tokenizer
from .evaluation import CLASS_TASKS, Ensemble, format_class_metrics, write_evaluation
from .report import format_metrics


# ---- command line --------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m smarter_fast.evaluate", description=(
        "Evaluate a MultitaskBert checkpoint (or several, as one ensemble) on CS224N dev sets and "
        "write leaderboard predictions."))
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="DIR",
                   help="checkpoint directory (e.g. RUN/checkpoints/best); several: an ensemble whose "
                        "raw outputs are averaged (they must share pair_features and pair_order)")
    p.add_argument("--data-dir", required=True, help="CS224N data directory")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint directory; "
                                               "required for several)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None,
                   help="truncation length (default: the training run's, from trainer_state.json, else 128)")
    p.add_argument("--backend", choices=("auto", "ref", "cpp", "triton"), default="auto")
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_length is not None and not 8 <= args.max_length <= 512:  # as the trainer's
        p.error(f"--max-length must be in [8, 512] (BERT position embeddings), got {args.max_length}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from .model import MultitaskBert
    ckpts = [Path(c) for c in args.checkpoint]
    for ckpt in ckpts:
        if not ckpt.is_dir():
            print(f"error: checkpoint directory {ckpt} not found", file=sys.stderr)
            return 2
    if len(ckpts) > 1 and not args.out:
        p.error("--out is required with several checkpoints")
    ckpt = ckpts[0]
    out = Path(args.out) if args.out else ckpt
    if args.max_length is None:
        args.max_length = 128
        state_file = ckpt / "trainer_state.json"
        if state_file.is_file():
            try:
                args.max_length = int(json.loads(state_file.read_text())["args"]["max_length"])
            except (ValueError, KeyError, TypeError):
                pass
    try:
        tokenizer = load_tokenizer(ckpt, max_length=args.max_length)
        models = [MultitaskBert.from_pretrained(c, backend=args.backend) for c in ckpts]
        model = models[0] if len(models) == 1 else Ensemble(models)
        t0 = time.time()
        metrics = write_evaluation(model, tokenizer, args.data_dir, out, args.batch_size)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dev: {format_metrics(metrics)}  {format_class_metrics(metrics)}  "
          f"({time.time() - t0:.1f}s)")
    plots = [out / "plots" / f"{t.name}_confusion.png" for t in CLASS_TASKS]
    print(f"wrote {', '.join(str(f) for f in [out / 'predictions', out / 'dev_metrics.json', *plots])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
