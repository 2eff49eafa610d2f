"""`python -m smarter_fast.export DIR --to {transformers,sentence-transformers} OUT`: a trained
MultitaskBert checkpoint as directories that transformers or sentence-transformers load, exact to
our outputs. What is exported, and what is refused and why: smarter_fast/model/export.py.
"""

from __future__ import annotations

import argparse
import sys

from .model.export import (FORMATS, SENTENCE_TRANSFORMERS, TRANSFORMERS, ExportError,
                           export_sentence_transformers, export_transformers)
from .tasks import TASK_NAMES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m smarter_fast.export", description=(
        "Export a MultitaskBert checkpoint for transformers (one BertForSequenceClassification "
        "directory per task) or sentence-transformers (the sentence embedding, optionally followed "
        "by a single-sentence head), each with its tokenizer and a model card."))
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint directory (e.g. RUN/checkpoints/best)")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="the library to export for")
    p.add_argument("out", metavar="OUT", help="output directory (new or empty)")
    p.add_argument("--with-head", choices=TASK_NAMES, default=None,
                   help="sentence-transformers only: append this task's head, so encode() returns its "
                        "outputs (single-sentence tasks only)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncation length of the exported tokenizer (default: the training run's, from "
                        "trainer_state.json, else 128)")
    args = p.parse_args(argv)
    if args.with_head is not None and args.to != SENTENCE_TRANSFORMERS:
        p.error("--with-head goes with --to sentence-transformers (the transformers export writes "
                "one directory per task)")
    if args.max_length is not None and not 8 <= args.max_length <= 512:  # as the trainer's
        p.error(f"--max-length must be in [8, 512] (BERT position embeddings), got {args.max_length}")
    try:
        if args.to == TRANSFORMERS:
            result = export_transformers(args.checkpoint, args.out, args.max_length)
        else:
            result = export_sentence_transformers(args.checkpoint, args.out, args.with_head,
                                                  args.max_length)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, directory in result.written.items():
        print(f"wrote {name}: {directory}")
    for name, why in result.refused.items():
        print(f"not exported: {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
