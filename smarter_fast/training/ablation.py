"""The ablation study's configurations and its report: a table of each configuration's best
epoch, plots, and an SST error analysis (what `python -m smarter_fast.ablate` writes).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..tasks import METRIC_KEYS, SST, TASK_NAMES

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


def limited_data(src: Path, dst: Path, train_limit, dev_limit: int) -> Path:
    """Copies of the train files (first train_limit rows) and dev files (first dev_limit rows) of
    a CS224N directory, for quick ablations; test files are left out (they are optional)."""
    from ..data.cs224n import find_data_files
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


# ---- report ------------------------------------------------------------------------------------------
def _rows(out: Path) -> list[dict]:
    from ..report import read_metrics
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
    from ..report import _pyplot, _save
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
    from ..data.cs224n import load_cs224n
    from ..evaluation import read_predictions
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
    """out/report.md for the configurations `names` of an ablation run with `args`."""
    from ..report import atomic_write_text, plot_confusion_matrix
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
