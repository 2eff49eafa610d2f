"""`python -m smarter_fast.ablate`: the report's experiments and the "beyond the report" options in
one command, with a markdown report.

    python -m smarter_fast.ablate --data-dir DIR --epochs N [--limit N] --out DIR [--only a,b]
    python -m smarter_fast.ablate --data-dir DIR --only recipe --time-budget 8 --jobs 2 \
        --num-threads 1 --out DIR          # the recipe search: minilm-cpu and one change at a time

Every configuration trains with `python -m smarter_fast.train` (in this process by default, or
one subprocess each with --subprocess) into --out/<config>/ and is marked done there
(ablate_done.json); started again, finished configurations are skipped (same arguments) and an
unfinished one resumes from its last checkpoint. With --seeds N every configuration trains N times,
with seeds SEED, SEED+1, ... (SEED: --seed, else train's default), into --out/<config>/seed-<seed>/,
each run skipped or resumed on its own. Then --out/report.md gets:
- a table of the dev metrics of each configuration's best epoch and its training time per epoch
  (with --seeds N: the mean ± sample standard deviation over the seeds; the per-seed rows are in
  --out/runs.csv and --out/report.json, which every ablation writes);
- plots (--out/plots/): dev learning curves with and without SMART, the training loss per
  schedule, the SST dev confusion matrix of the best configuration;
- an SST error analysis of the best configuration: the largest confusion cells with a few
  misclassified dev sentences, and per gold class the words most indicative of it (with counts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .training.ablation import (CONFIGS, DEFAULT_NAMES, GROUPS, NAMES,  # noqa: E402 (after the OpenMP setting)
                                limited_data, seed_dir, write_report)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smarter_fast.ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CS224N data directory")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per configuration (default: 2; with --time-budget: until the budget)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="training minutes per configuration (train --time-budget)")
    p.add_argument("--jobs", type=int, default=1,
                   help="configurations trained at once, one subprocess each (give each a share of "
                        "the cores with --num-threads)")
    p.add_argument("--limit", type=int, default=None, help="keep the first N rows of each training file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--only", default=None,
                   help=f"comma-separated configurations or groups ({', '.join(GROUPS)}); default: all "
                        f"but the recipe group; configurations: {', '.join(NAMES)}")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every run (default: train's); with --seeds N the first of N")
    p.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                   help="train every configuration with N seeds (SEED, SEED+1, ...) in "
                        "--out/<config>/seed-<seed>/ and report each metric as mean ± sample "
                        "standard deviation over them; 1: one run in --out/<config>/")
    p.add_argument("--train-args", default="", help="more arguments for every training run (one string)")
    p.add_argument("--subprocess", action="store_true", help="one subprocess per configuration")
    p.add_argument("--dev-limit", type=int, default=None,
                   help="evaluate on the first N rows of each dev file (a truncated copy of the "
                        "data, without test files, is written to --out/_data): much faster runs; "
                        "the metrics are then on that dev subset")
    return p


def train_argv(args, extra: list[str], out: Path, seed: int | None = None) -> list[str]:
    """The train arguments of one run; `seed` (None: --seed, if given) is its --seed."""
    argv = ["--data-dir", str(args.data_dir), "--out", str(out)]
    for flag, value in (("--epochs", args.epochs), ("--time-budget", args.time_budget), ("--limit", args.limit), ("--pretrained", args.pretrained),
                        ("--batch-size", args.batch_size), ("--lr", args.lr),
                        ("--max-length", args.max_length), ("--num-threads", args.num_threads),
                        ("--seed", args.seed if seed is None else seed)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + args.train_args.split() + extra


def run_config(name: str, argv: list[str], out: Path, use_subprocess: bool,
               data: dict | None = None) -> dict:
    """Train one configuration; returns its record. `data` says which data it trains and is
    evaluated on (the source directory and --dev-limit: the --data-dir in argv may be the same
    _data copy for different limits). A configuration finished with the same argv and data is
    skipped; one started with them is resumed; one started or finished with other settings is
    moved aside (OUT/<name>.replaced-<time>, said on the console) and trained afresh."""
    key = {"argv": argv, "data": data or {}}
    started = out / "ablate_started.json"
    for record in (out / "ablate_done.json", started):
        if not record.is_file():
            continue
        rec = json.loads(record.read_text())
        # records written before the data key existed compare by argv alone
        same = rec.get("argv") == argv and rec.get("data", key["data"]) == key["data"]
        if same and record.name == "ablate_done.json" and rec.get("rc") == 0:
            print(f"[{name}] done already, skipped", flush=True)
            return rec
        if not same:
            aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            print(f"[{name}] its settings changed since the earlier run; that run's outputs are "
                  f"now in {aside}; training afresh", flush=True)
        break
    out.mkdir(parents=True, exist_ok=True)
    if not started.is_file():
        started.write_text(json.dumps(key, indent=2) + "\n")
    full = argv + ["--resume"]
    t0 = time.time()
    log = out / "train.log"
    print(f"[{name}] python -m smarter_fast.train {' '.join(argv)}", flush=True)
    if use_subprocess:
        with open(log, "a") as f:
            rc = subprocess.call([sys.executable, "-m", "smarter_fast.train", *full], stdout=f,
                                 stderr=subprocess.STDOUT)
    else:
        from .train import main as train_main
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                rc = train_main(full)
            except SystemExit as e:
                rc = int(e.code or 0)
            except Exception as e:  # noqa: BLE001 - one failed configuration must not stop the rest
                print(f"error: {type(e).__name__}: {e}", file=f)
                rc = 1
    rec = {"name": name, **key, "rc": rc, "wall_seconds": time.time() - t0}
    if rc == 0:
        (out / "ablate_done.json").write_text(json.dumps(rec, indent=2) + "\n")
    tail = "" if rc == 0 else f" FAILED (rc {rc}); see {log}"
    print(f"[{name}] {rec['wall_seconds']:.0f}s{tail}", flush=True)
    return rec


def default_seed() -> int:
    """The seed `python -m smarter_fast.train` uses without --seed."""
    from .train import build_parser as train_parser
    return train_parser().get_default("seed")


def plan_runs(args, names, out: Path) -> list[dict]:
    """One run per configuration and seed: name, seed, dir, argv and label (the console's). With
    one seed the run is the configuration's, in OUT/<config>/, and its argv has --seed only where
    ablate was given one (as before --seeds)."""
    extra = {n: a for n, _, a in CONFIGS}
    base = args.seed if args.seed is not None else default_seed()
    runs = []
    for name in names:
        for seed in range(base, base + args.seeds):
            d = seed_dir(out, name, seed, args.seeds)
            runs.append({"name": name, "seed": seed, "dir": d,
                         "argv": train_argv(args, extra[name], d, seed if args.seeds > 1 else None),
                         "label": name if args.seeds == 1 else f"{name} seed {seed}"})
    return runs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs is None and args.time_budget is None:
        args.epochs = 2
    names = DEFAULT_NAMES if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    names = list(dict.fromkeys(m for n in names for m in GROUPS.get(n, [n])))  # groups -> names
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(f"error: unknown configuration(s) {', '.join(unknown)}; expected some of {', '.join(NAMES)}",
              file=sys.stderr)
        return 2
    if args.seeds > 1 and "--seed" in args.train_args.split():
        print("error: with --seeds give the first seed with --seed, not in --train-args", file=sys.stderr)
        return 2
    if not Path(args.data_dir).is_dir():
        print(f"error: --data-dir {args.data_dir} not found", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"source": str(Path(args.data_dir).resolve()), "dev_limit": args.dev_limit}
    if args.dev_limit is not None:
        args.data_dir = str(limited_data(Path(args.data_dir), out / "_data", args.limit, args.dev_limit))
        print(f"data: first {args.dev_limit} dev rows per task (copy in {args.data_dir})", flush=True)
    runs = plan_runs(args, names, out)
    if args.jobs > 1:  # one subprocess per run, --jobs at a time
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_config, r["label"], r["argv"], r["dir"], True, data) for r in runs]
            for r, f in zip(runs, futures):
                r["rc"] = f.result()["rc"]
    else:
        for r in runs:
            r["rc"] = run_config(r["label"], r["argv"], r["dir"], args.subprocess, data)["rc"]
            if r["rc"] >= 128:  # the trainer was stopped by a signal (it saved): stop too
                print(f"stopped during {r['label']}; run again to resume", file=sys.stderr)
                return r["rc"]
    report = write_report(args, out, names, runs)
    print(f"report: {report}", flush=True)
    print(report.read_text().split("\n## ")[0], flush=True)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
