"""`python -m smarter_fast.predict --checkpoint DIR [DIR ...] --task sst|quora|sts [--input FILE]
[--output FILE] [--format jsonl|cs224n]`: a trained model's predictions on new text, one result
per input row. Inputs: smarter_fast/data/text_input.py; the model: smarter_fast/inference.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see smarter_fast/evaluate.py); before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import tasks as registry
from .data.cs224n import DataError
from .data.text_input import FORMATS, open_text, read_inputs, stdin_text

OUTPUT_FORMATS = ("jsonl", "cs224n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smarter_fast.predict", description=(
        "Predict with a trained checkpoint (or several, as one ensemble) on new text: SST sentiment "
        "(label 0-4 and class probabilities), Quora paraphrase (probability and label) or STS "
        "similarity (score 0-5). Reads standard input unless --input is given."))
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="DIR",
                   help="checkpoint directory (e.g. RUN/checkpoints/best); several: an ensemble whose "
                        "raw outputs are averaged")
    p.add_argument("--task", required=True, choices=registry.TASK_NAMES,
                   help="; ".join(f"{t.name}: {t.title} ({'pairs' if t.is_pair else 'sentences'})"
                                  for t in registry.TASKS))
    p.add_argument("--input", default="-", metavar="FILE",
                   help="input file, '-' for standard input (default: -)")
    p.add_argument("--input-format", choices=FORMATS, default="auto",
                   help="csv: a CSV/TSV file whose header names the sentence columns (CS224N files as "
                        "they are); jsonl: one JSON object per line; lines: one sentence, or two "
                        "separated by a tab, per line (ids: line numbers from 0); auto: jsonl when the "
                        "first line is a JSON object, csv when it is a header naming the columns, else "
                        "lines (default: auto)")
    p.add_argument("--columns", nargs="+", metavar="NAME", default=None,
                   help="the sentence column(s) or JSON key(s) (default: sentence for sst, sentence1 "
                        "sentence2 for the pair tasks, as in the CS224N files)")
    p.add_argument("--output", default="-", metavar="FILE",
                   help="output file, '-' for standard output (default: -)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="jsonl",
                   help="jsonl: one JSON object per row (id and the result's fields); cs224n: the "
                        "leaderboard prediction file that evaluate writes (default: jsonl)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first malformed row (default: skip it and report it)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when torch sees one (default: auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None,
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
    import torch
    from .evaluation import format_value
    from .inference import as_record, load
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    spec = registry.task(args.task)
    name = "<stdin>" if args.input == "-" else args.input
    t0 = time.time()
    try:
        with (stdin_text(sys.stdin) if args.input == "-" else open_text(args.input)) as stream:
            examples, report = read_inputs(stream, args.task, args.input_format, args.columns,
                                           args.strict, name)
        for message in report.messages():
            print(message, file=sys.stderr)
        if report.rows_read and not examples:
            raise DataError(f"{name}: none of its {report.rows_read} rows is usable")
        model = load(args.checkpoint, device=args.device, precision=args.precision,
                     backend=args.backend, batch_size=args.batch_size, max_length=args.max_length)
        inputs = [(e.sentence1, e.sentence2) for e in examples] if spec.is_pair else \
            [e.sentence for e in examples]
        results = model.predict(args.task, inputs)
    except (DataError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "jsonl":
        lines = [json.dumps({"id": e.id, **as_record(r)}) for e, r in zip(examples, results)]
    else:  # as evaluation.write_predictions lays a leaderboard file out
        value = {"classification": "label", "binary": "label", "regression": "score"}[spec.kind]
        lines = [f"id \t {spec.prediction_header} "]
        lines += [f"{e.id} , {format_value(args.task, getattr(r, value))} "
                  for e, r in zip(examples, results)]
    text = "".join(line + "\n" for line in lines)
    if args.output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from .report import atomic_write_text
        atomic_write_text(Path(args.output), text)
    skipped = f", {report.rows_skipped} skipped" if report.rows_skipped else ""
    print(f"predicted {len(results)} {spec.title} row(s){skipped} with {', '.join(args.checkpoint)} "
          f"({model.device}, {model.precision}) in {time.time() - t0:.1f}s"
          + ("" if args.output == "-" else f"; wrote {args.output}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
