"""`python -m smarter_fast.ablate`: the report's experiments and the "beyond the report" options in
one command, with a markdown report.

    python -m smarter_fast.ablate --data-dir DIR --epochs N [--limit N] --out DIR [--only a,b]
    python -m smarter_fast.ablate --data-dir DIR --only recipe --time-budget 8 --jobs 2 \
        --num-threads 1 --out DIR          # the recipe search: minilm-cpu and one change at a time

Every configuration trains with `python -m smarter_fast.train` (in this process by default, or
one subprocess each with --subprocess) into --out/<config>/ and is marked done there
(ablate_done.json); started again, finished configurations are skipped (same arguments) and an
unfinished one resumes from its last checkpoint. Then --out/report.md gets:
- a table of the dev metrics of each configuration's best epoch and its training time per epoch;
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
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .tasks import METRIC_KEYS, SST, TASK_NAMES  # noqa: E402 (after the OpenMP setting, as torch loads)

# (name, group, train arguments). "split1" is also the dropout-0 and SMART-off configuration.
CONFIGS = [
    ("baseline", "schedule", ["--schedule", "baseline"]),
    ("split1", "schedule", ["--schedule", "split1"]),
    ("split2", "schedule", ["--schedule", "split2"]),
    ("dropout-0.1", "dropout", ["--schedule", "split1", "--dropout", "0.1"]),
    ("dropout-0.2", "dropout", ["--schedule", "split1", "--dropout", "0.2"]),
    ("dropout-0.3", "dropout", ["--schedule", "split1", "--dropout", "0.3"]),
    ("smart-simple", "smart", ["--schedule", "split1", "--smart", "simple"]),
    ("smart-full", "smart", ["--schedule", "split1", "--smart", "full"]),
    ("round-robin", "sampler", ["--schedule", "round-robin"]),
    ("proportional", "sampler", ["--schedule", "proportional"]),
    ("sqrt", "sampler", ["--schedule", "sqrt"]),
    ("annealed", "sampler", ["--schedule", "annealed"]),
    ("pcgrad", "surgery", ["--schedule", "split1", "--grad-surgery", "pcgrad"]),
    ("gradvac", "surgery", ["--schedule", "split1", "--grad-surgery", "gradvac"]),
    # the recipe search (--only recipe, with --time-budget): the report's recipe, the minilm-cpu
    # recipe, and minilm-cpu with one setting changed
    ("recipe-report", "recipe", ["--recipe", "report"]),
    ("minilm-cpu", "recipe", ["--recipe", "minilm-cpu"]),
    ("mc-pair-both", "recipe", ["--recipe", "minilm-cpu", "--pair-features", "both"]),
    ("mc-pair-bi", "recipe", ["--recipe", "minilm-cpu", "--pair-features", "bi"]),
    ("mc-pool-cls", "recipe", ["--recipe", "minilm-cpu", "--pooling", "cls"]),
    ("mc-lr-1e-4", "recipe", ["--recipe", "minilm-cpu", "--lr", "1e-4"]),
    ("mc-lr-2e-5", "recipe", ["--recipe", "minilm-cpu", "--lr", "2e-5"]),
    ("mc-batch-32", "recipe", ["--recipe", "minilm-cpu", "--batch-size", "32"]),
    ("mc-batch-8", "recipe", ["--recipe", "minilm-cpu", "--batch-size", "8"]),
    ("mc-fp32", "recipe", ["--recipe", "minilm-cpu", "--precision", "fp32"]),
    ("mc-split1", "recipe", ["--recipe", "minilm-cpu", "--schedule", "split1", "--interleave"]),
    ("mc-proportional", "recipe", ["--recipe", "minilm-cpu", "--schedule", "proportional"]),
    ("mc-smart", "recipe", ["--recipe", "minilm-cpu", "--smart", "simple"]),
    ("mc-layer-decay", "recipe", ["--recipe", "minilm-cpu", "--layer-decay", "0.9"]),
    ("mc-dropout-0", "recipe", ["--recipe", "minilm-cpu", "--dropout", "0"]),
    ("mc-label-smoothing", "recipe", ["--recipe", "minilm-cpu", "--label-smoothing", "0.1"]),
    ("mc-given-order", "recipe", ["--recipe", "minilm-cpu", "--pair-order", "given"]),
    ("mc-no-ema", "recipe", ["--recipe", "minilm-cpu", "--ema", "0"]),
]
NAMES = [c[0] for c in CONFIGS]
GROUPS = {g: [n for n, gg, _ in CONFIGS if gg == g] for _, g, _ in CONFIGS}
DEFAULT_NAMES = [n for n, g, _ in CONFIGS if g != "recipe"]  # the recipe search is asked for by name
SST_NAMES = ["very negative", "negative", "neutral", "positive", "very positive"]


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
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train-args", default="", help="more arguments for every training run (one string)")
    p.add_argument("--subprocess", action="store_true", help="one subprocess per configuration")
    p.add_argument("--dev-limit", type=int, default=None,
                   help="evaluate on the first N rows of each dev file (a truncated copy of the "
                        "data, without test files, is written to --out/_data): much faster runs; "
                        "the metrics are then on that dev subset")
    return p


def limited_data(src: Path, dst: Path, train_limit, dev_limit: int) -> Path:
    """Copies of the train files (first train_limit rows) and dev files (first dev_limit rows) of
    a CS224N directory, for quick ablations; test files are left out (they are optional)."""
    from .data.cs224n import find_data_files
    dst.mkdir(parents=True, exist_ok=True)
    files = find_data_files(src)
    for split, keep in (("train", train_limit), ("dev", dev_limit)):
        for task_files in files.values():
            path = Path(task_files[split])
            with open(path, "rb") as f:  # bytes: a bad UTF-8 row is the readers' to report
                lines = f.readlines()
            if keep is not None:
                lines = lines[:1 + keep]
            with open(dst / path.name, "wb") as f:
                f.write(b"".join(lines))
    return dst


def train_argv(args, extra: list[str], out: Path) -> list[str]:
    argv = ["--data-dir", str(args.data_dir), "--out", str(out)]
    for flag, value in (("--epochs", args.epochs), ("--time-budget", args.time_budget), ("--limit", args.limit), ("--pretrained", args.pretrained),
                        ("--batch-size", args.batch_size), ("--lr", args.lr),
                        ("--max-length", args.max_length), ("--num-threads", args.num_threads),
                        ("--seed", args.seed)):
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


# ---- report ------------------------------------------------------------------------------------------
def _rows(out: Path) -> list[dict]:
    from .report import read_metrics
    return read_metrics(out / "metrics.jsonl")


def summarise(out: Path, names) -> list[dict]:
    table = []
    for name in names:
        rows = _rows(out / name)
        if not rows:
            table.append({"name": name, "missing": True})
            continue
        best = max(rows, key=lambda r: r["mean_score"])
        secs = [r["train_seconds"] for r in rows]
        table.append({"name": name, "best_epoch": best["epoch"], "epochs": len(rows),
                      "train_minutes": sum(secs) / 60.0,
                      **{k: best[k] for k in (*METRIC_KEYS, "mean_score", "cs224n_score")},
                      "seconds_per_epoch": sum(secs) / len(secs),
                      "examples_per_second": sum(r["train_examples"] for r in rows) / max(sum(secs), 1e-9),
                      "rows": rows})
    return table


def _plot_lines(series: dict, key: str, path: Path, title: str, ylabel: str):
    from .report import _pyplot, _save
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in series.items():
        xs = [r["epoch"] for r in rows if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def _train_loss(r: dict):
    vals = [r.get(f"train_loss_{t}") for t in TASK_NAMES]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def make_plots(out: Path, table: list[dict]) -> dict:
    plots = out / "plots"
    by = {t["name"]: t["rows"] for t in table if not t.get("missing")}
    made = {}
    smart = {n: by[n] for n in ("split1", "smart-simple", "smart-full") if n in by}
    if smart:
        made["learning curves with and without SMART (dev mean score)"] = _plot_lines(
            smart, "mean_score", plots / "smart_learning_curves.png",
            "Dev mean score with and without SMART (split1)", "dev mean score")
    sched = {n: [{**r, "train_loss_mean": _train_loss(r)} for r in by[n]]
             for n in ("baseline", "split1", "split2", "round-robin", "proportional", "sqrt", "annealed",
                       "pcgrad", "gradvac") if n in by}
    if sched:
        made["training loss per schedule (mean of the three task losses)"] = _plot_lines(
            sched, "train_loss_mean", plots / "training_loss_per_schedule.png",
            "Training loss per schedule", "mean task training loss")
    return made


def sst_error_analysis(data_dir, run_dir: Path, n_cells: int = 3, n_examples: int = 3, n_words: int = 8):
    """(markdown, confusion matrix) for the SST dev predictions of a run."""
    from .data.cs224n import load_cs224n
    from .evaluate import read_predictions
    dev = load_cs224n(data_dir, "dev").sst
    preds = read_predictions(run_dir / "predictions" / SST.prediction_file("dev"))
    m = [[0] * 5 for _ in range(5)]
    cells: dict = {}
    for e in dev:
        if e.id not in preds:
            continue
        p = int(float(preds[e.id]))
        m[e.label][p] += 1
        if p != e.label:
            cells.setdefault((e.label, p), []).append(e.sentence)
    lines = ["| gold \\ predicted | " + " | ".join(SST_NAMES) + " |", "|---" * 6 + "|"]
    lines += [f"| **{SST_NAMES[i]}** | " + " | ".join(str(v) for v in m[i]) + " |" for i in range(5)]
    lines.append("")
    lines.append("Largest confusion cells (gold -> predicted), with misclassified dev sentences:")
    lines.append("")
    for (g, p), sents in sorted(cells.items(), key=lambda kv: -len(kv[1]))[:n_cells]:
        lines.append(f"- **{SST_NAMES[g]} -> {SST_NAMES[p]}** ({len(sents)} sentences), e.g.:")
        for s in sents[:n_examples]:
            lines.append(f"  - \"{s.strip()[:200]}\"")
    lines.append("")
    lines.append("Words most indicative of each gold class in SST dev (count in the class / in all "
                 "of dev; words seen at least 3 times, ranked by that share):")
    lines.append("")
    word = re.compile(r"[a-z][a-z'-]+")
    per_class = [Counter() for _ in range(5)]
    for e in dev:
        for w in set(word.findall(e.sentence.lower())):
            per_class[e.label][w] += 1
    total = Counter()
    for c in per_class:
        total.update(c)
    for k in range(5):
        cand = [(per_class[k][w] / total[w], per_class[k][w], w) for w in per_class[k] if total[w] >= 3]
        cand.sort(key=lambda x: (-x[0], -x[1], x[2]))
        words = ", ".join(f"{w} ({c}/{total[w]})" for _, c, w in cand[:n_words])
        lines.append(f"- **{SST_NAMES[k]}**: {words}")
    return "\n".join(lines) + "\n", m


def write_report(args, out: Path, names, records: dict) -> Path:
    from .report import atomic_write_text, plot_confusion_matrix
    # a configuration that failed in this session counts as missing, whatever an earlier run left
    failed = {n for n, r in records.items() if r.get("rc") not in (None, 0)}
    table = [{"name": t["name"], "missing": True} if t["name"] in failed else t
             for t in summarise(out, names)]
    args_of = {n: a for n, _, a in CONFIGS}
    lines = [f"# Ablation report", "",
             f"Data: `{args.data_dir}`; "
             + (f"time budget {args.time_budget:g} min" + (f", at most {args.epochs} epoch(s)" if args.epochs else "")
                if args.time_budget else f"{args.epochs} epoch(s)")
             + (f", --limit {args.limit}" if args.limit else "")
             + (f", --dev-limit {args.dev_limit} (dev metrics on that subset)" if args.dev_limit else "")
             + (f"; extra train arguments `{args.train_args}`" if args.train_args else "")
             + ". Dev metrics of each configuration's best epoch (by mean score); time per epoch is "
               "the training loop only (no evaluation).", "",
             "| config | train arguments | best epoch | SST acc | Quora acc | STS r | mean | CS224N | s/epoch | train min | ex/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        a = " ".join(args_of.get(t["name"], []))
        if t.get("missing"):
            rc = records.get(t["name"], {}).get("rc")
            lines.append(f"| {t['name']} | `{a}` | failed (rc {rc}) | | | | | | | | |")
            continue
        scores = " | ".join(f"{t[k]:.3f}" for k in METRIC_KEYS)
        lines.append(f"| {t['name']} | `{a}` | {t['best_epoch']}/{t['epochs']} | {scores} | {t['mean_score']:.3f} | "
                     f"{t['cs224n_score']:.3f} | {t['seconds_per_epoch']:.1f} | {t['train_minutes']:.1f} | "
                     f"{t['examples_per_second']:.1f} |")
    lines.append("")
    lines.append("`split1` is also the dropout-0 and the SMART-off configuration.")
    lines.append("")
    plots = make_plots(out, table)
    done = [t for t in table if not t.get("missing")]
    if done:
        best = max(done, key=lambda t: t["mean_score"])
        text, m = sst_error_analysis(args.data_dir, out / best["name"])
        plots["SST dev confusion matrix of the best configuration"] = plot_confusion_matrix(
            m, out / "plots" / "sst_confusion_best.png", title=f"SST dev confusion ({best['name']})")
        lines += ["## Plots", ""]
        for title, path in plots.items():
            lines += [f"**{title}**", "", f"![{title}]({path.relative_to(out)})", ""]
        lines += [f"## SST error analysis (best configuration: {best['name']}, "
                  f"mean {best['mean_score']:.3f})", "", text]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


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
    if not Path(args.data_dir).is_dir():
        print(f"error: --data-dir {args.data_dir} not found", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"source": str(Path(args.data_dir).resolve()), "dev_limit": args.dev_limit}
    if args.dev_limit is not None:
        args.data_dir = str(limited_data(Path(args.data_dir), out / "_data", args.limit, args.dev_limit))
        print(f"data: first {args.dev_limit} dev rows per task (copy in {args.data_dir})", flush=True)
    extra = {n: a for n, _, a in CONFIGS}
    records = {}
    if args.jobs > 1:  # one subprocess per configuration, --jobs at a time
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {n: pool.submit(run_config, n, train_argv(args, extra[n], out / n), out / n, True,
                                      data) for n in names}
            records = {n: f.result() for n, f in futures.items()}
    else:
        for name in names:
            records[name] = run_config(name, train_argv(args, extra[name], out / name), out / name,
                                       args.subprocess, data)
            if records[name]["rc"] >= 128:  # the trainer was stopped by a signal (it saved): stop too
                print(f"stopped during {name}; run again to resume", file=sys.stderr)
                return records[name]["rc"]
    report = write_report(args, out, names, records)
    print(f"report: {report}", flush=True)
    print(report.read_text().split("\n## ")[0], flush=True)
    return 0 if all(r.get("rc") == 0 for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
