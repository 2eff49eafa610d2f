"""`python -m smarter_fast.selfcheck`: on a CUDA machine, run the CUDA tests and time the hot
paths against PyTorch and Hugging Face, printing a table and writing it to a file.

Without CUDA it says so and exits 0. It needs no `pip install`: run it from a source checkout
with the repository on PYTHONPATH (the C++ extension is CPU-only and JIT-builds if it is used at
all). Weights are random, in the shapes of all-MiniLM-L6-v2 (the default checkpoint, whose
package may be absent on the GPU machine), so no download is needed.

    python -m smarter_fast.selfcheck [--out selfcheck.md] [--skip-tests] [--no-autotune]

Timings use CUDA events after warm-up (which also runs Triton's autotuning), each the median of
several repetitions. Rows:
- attention forward+backward vs torch SDPA with the boolean key-padding mask, B=32, H=12,
  L=64/128, D=32/64, bf16, lengths uniform in [L/2, L] (right padding), every backend of
  smarter_fast.ops.attention that runs on CUDA;
- AdamW over one flat fp32 buffer of the MiniLM parameter count: GB/s at 28 bytes/param and
  as a share of a measured device-to-device copy, vs torch.optim.AdamW(fused=True);
- a SMART step (clean + perturbed passes) vs a plain step, MultitaskBert at batch 8;
- an end-to-end training step vs Hugging Face transformers' BertModel (when importable).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m smarter_fast.selfcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="selfcheck.md", help="markdown file for the table")
    ap.add_argument("--skip-tests", action="store_true", help="only the timings")
    ap.add_argument("--tests-timeout", type=int, default=170, help="seconds for pytest")
    ap.add_argument("--no-autotune", action="store_true",
                    help="fixed Triton configs (SMARTER_FAST_TRITON_AUTOTUNE=0)")
    ap.add_argument("--backend", default="auto", help="backend for the model timings")
    ap.add_argument("--adamw-params", type=int, default=22_713_216,
                    help="parameter count for the AdamW row (default: all-MiniLM-L6-v2's)")
    ap.add_argument("--compile", action="store_true",
                    help="no GPU needed: compile every Triton launch ahead of time for sm_80 and "
                         "sm_90 and check shared memory and register spills (writes --out, and "
                         "the rows as JSON beside it); exit 1 if a launch breaks a rule")
    ap.add_argument("--full", action="store_true",
                    help="with --compile: every length bucket (default: bucket 128, as CI)")
    return ap


def compile_check(out: str, full: bool) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from .ops.gpu_compile import run, table

    rows = run(full=full)
    Path(out).write_text(table(rows))
    Path(out).with_suffix(".json").write_text(
        json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    bad = [r for r in rows if r.problems]
    for r in bad:
        print(f"{r.kernel} {r.config} sm_{r.target} {r.case}: {'; '.join(r.problems)}")
    print(f"{len(rows)} compiled launches, {len(bad)} breaking a rule (table: {out})")
    return 1 if bad else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.compile:
        return compile_check(args.out if args.out != "selfcheck.md" else "gpu-compile.md", args.full)
    from .diagnostics.cuda import run

    return run(args.out, args.skip_tests, args.tests_timeout, args.no_autotune, args.backend,
               args.adamw_params)


if __name__ == "__main__":
    sys.exit(main())
