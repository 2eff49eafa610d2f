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
# what the report gives per configuration: the dev metrics of the best epoch and the training speed
STAT_KEYS = (*METRIC_KEYS, "mean_score", "cs224n_score", "seconds_per_epoch", "train_minutes",
             "examples_per_second")


def seed_dir(out: Path, name: str, seed: int, n_seeds: int) -> Path:
    """Where a configuration trains with `seed`: OUT/<config>/ when it trains once (as before
    --seeds), OUT/<config>/seed-<seed>/ when it trains with several seeds."""
    return out / name if n_seeds == 1 else out / name / f"seed-{seed}"


def _rows(out: Path) -> list[dict]:
    from ..report import read_metrics
    return read_metrics(out / "metrics.jsonl")


def summarise_run(run: Path) -> dict | None:
    """The dev metrics of the best epoch (by mean score) of the run in `run`, its training speed
    and its metrics rows; None where it left no metrics."""
    rows = _rows(run)
    if not rows:
        return None
    best = max(rows, key=lambda r: r["mean_score"])
    secs = [r["train_seconds"] for r in rows]
    return {"best_epoch": best["epoch"], "epochs": len(rows), "train_minutes": sum(secs) / 60.0,
            **{k: best[k] for k in (*METRIC_KEYS, "mean_score", "cs224n_score")},
            "seconds_per_epoch": sum(secs) / len(secs),
            "examples_per_second": sum(r["train_examples"] for r in rows) / max(sum(secs), 1e-9),
            "rows": rows}


def mean_sd(values) -> dict:
    """{"mean", "sd", "n"} of `values`: sd is the sample standard deviation (n - 1 in the
    denominator), None for fewer than two values (the report shows "-"); mean is None for none."""
    import statistics
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def format_mean_sd(stat: dict, digits: int = 3) -> str:
    """"0.512 ± 0.013"; "0.512 ± -" for a single value; "" for none."""
    if not stat["n"]:
        return ""
    sd = "-" if stat["sd"] is None else f"{stat['sd']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {sd}"


def summarise(runs: list[dict], names) -> list[dict]:
    """One entry per configuration of `names`: its runs (one per seed; `runs` holds dicts with
    name, seed, dir and rc) each with its summary or `missing` (it failed in this session, or
    left no metrics), n (the runs not missing) and the mean ± sd of STAT_KEYS over those."""
    table = []
    for name in names:
        mine = []
        for r in (r for r in runs if r["name"] == name):
            # a run that failed in this session counts as missing, whatever an earlier run left
            s = summarise_run(Path(r["dir"])) if r.get("rc") in (None, 0) else None
            mine.append({"seed": r.get("seed"), "dir": str(r["dir"]), "rc": r.get("rc"),
                         **(s or {"missing": True})})
        ok = [m for m in mine if not m.get("missing")]
        table.append({"name": name, "runs": mine, "n": len(ok), "missing": not ok,
                      "stats": {k: mean_sd([m[k] for m in ok]) for k in STAT_KEYS}})
    return table


def _mean_rows(runs: list[dict]) -> list[dict]:
    """Per epoch, the mean over the runs (seeds) of the dev mean score and the task losses; a
    single run's rows as they are."""
    if len(runs) == 1:
        return runs[0]["rows"]
    keys = ("mean_score", *(f"train_loss_{t}" for t in TASK_NAMES))
    out = []
    for epoch in sorted({row["epoch"] for r in runs for row in r["rows"]}):
        at = [row for r in runs for row in r["rows"] if row["epoch"] == epoch]
        vals = {k: [row[k] for row in at if row.get(k) is not None] for k in keys}
        out.append({"epoch": epoch, **{k: sum(v) / len(v) if v else None for k, v in vals.items()}})
    return out


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
    """The learning-curve plots; with several seeds, each curve is the mean over the seeds."""
    plots = out / "plots"
    by = {t["name"]: _mean_rows([r for r in t["runs"] if not r.get("missing")])
          for t in table if not t.get("missing")}
    seeds = max((t["n"] for t in table), default=1)
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    made = {}
    smart = {n: by[n] for n in ("split1", "smart-simple", "smart-full") if n in by}
    if smart:
        made[f"learning curves with and without SMART (dev mean score){over}"] = _plot_lines(
            smart, "mean_score", plots / "smart_learning_curves.png",
            f"Dev mean score with and without SMART (split1){over}", "dev mean score")
    sched = {n: [{**r, "train_loss_mean": _train_loss(r)} for r in by[n]]
             for n in ("baseline", "split1", "split2", "round-robin", "proportional", "sqrt", "annealed",
                       "pcgrad", "gradvac") if n in by}
    if sched:
        made[f"training loss per schedule (mean of the three task losses){over}"] = _plot_lines(
            sched, "train_loss_mean", plots / "training_loss_per_schedule.png",
            f"Training loss per schedule{over}", "mean task training loss")
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


def _header(args, seeds: list) -> list[str]:
    lines = ["# Ablation report", "",
             f"Data: `{args.data_dir}`; "
             + (f"time budget {args.time_budget:g} min" + (f", at most {args.epochs} epoch(s)" if args.epochs else "")
                if args.time_budget else f"{args.epochs} epoch(s)")
             + (f", --limit {args.limit}" if args.limit else "")
             + (f", --dev-limit {args.dev_limit} (dev metrics on that subset)" if args.dev_limit else "")
             + (f"; extra train arguments `{args.train_args}`" if args.train_args else "")
             + ". Dev metrics of each configuration's best epoch (by mean score); time per epoch is "
               "the training loop only (no evaluation).", ""]
    if len(seeds) > 1:
        lines += [f"Every configuration trained with {len(seeds)} seeds ({', '.join(map(str, seeds))}; "
                  "OUT/<config>/seed-<seed>/). Each cell is the mean ± the sample standard deviation "
                  "(n - 1 in the denominator) over the seeds that finished, n of them (\"± -\": only "
                  "one finished); best epoch lists each seed's. A difference between configurations "
                  "within their standard deviations is within seed-to-seed noise. Per-seed rows: "
                  "runs.csv and report.json.", ""]
    return lines


def _table_one_seed(table: list[dict], args_of: dict) -> list[str]:
    lines = ["| config | train arguments | best epoch | SST acc | Quora acc | STS r | mean | CS224N | s/epoch | train min | ex/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        a = " ".join(args_of.get(t["name"], []))
        r = t["runs"][0] if t["runs"] else {}
        if t.get("missing"):
            lines.append(f"| {t['name']} | `{a}` | failed (rc {r.get('rc')}) | | | | | | | | |")
            continue
        scores = " | ".join(f"{r[k]:.3f}" for k in METRIC_KEYS)
        lines.append(f"| {t['name']} | `{a}` | {r['best_epoch']}/{r['epochs']} | {scores} | {r['mean_score']:.3f} | "
                     f"{r['cs224n_score']:.3f} | {r['seconds_per_epoch']:.1f} | {r['train_minutes']:.1f} | "
                     f"{r['examples_per_second']:.1f} |")
    return lines


def _table_seeds(table: list[dict], args_of: dict, out: Path) -> list[str]:
    """The table with one row per configuration, each cell the mean ± sd over its seeds; then the
    runs left out of the means."""
    import os
    lines = ["| config | train arguments | n | best epoch | SST acc | Quora acc | STS r | mean | CS224N | s/epoch | train min | ex/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    left_out = []
    for t in table:
        a = " ".join(args_of.get(t["name"], []))
        ok = [r for r in t["runs"] if not r.get("missing")]
        left_out += [(t["name"], r) for r in t["runs"] if r.get("missing")]
        n = f"{t['n']}" if t["n"] == len(t["runs"]) else f"{t['n']} of {len(t['runs'])}"
        if not ok:
            rcs = ", ".join(str(r.get("rc")) for r in t["runs"])
            lines.append(f"| {t['name']} | `{a}` | {n} | failed (rc {rcs}) | | | | | | | | |")
            continue
        epochs = (",".join(str(r["best_epoch"]) for r in ok) + "/"
                  + ",".join(str(e) for e in sorted({r["epochs"] for r in ok})))
        cells = [format_mean_sd(t["stats"][k], 3) for k in (*METRIC_KEYS, "mean_score", "cs224n_score")]
        cells += [format_mean_sd(t["stats"][k], 1)
                  for k in ("seconds_per_epoch", "train_minutes", "examples_per_second")]
        lines.append(f"| {t['name']} | `{a}` | {n} | {epochs} | " + " | ".join(cells) + " |")
    if left_out:
        lines += ["", "Runs left out of the means (failed, or no metrics):", ""]
        lines += [f"- `{name}` seed {r['seed']}: rc {r.get('rc')}; see "
                  f"`{os.path.relpath(Path(r['dir']) / 'train.log', out)}`" for name, r in left_out]
    return lines


def write_results(out: Path, table: list[dict], seeds: list) -> tuple[Path, Path]:
    """OUT/report.json (per configuration: n, the mean and sample sd of each STAT_KEYS entry, and
    its per-seed runs) and OUT/runs.csv (one row per configuration and seed)."""
    import csv
    import io
    import json
    import os

    from ..report import atomic_write_text
    args_of = {n: a for n, _, a in CONFIGS}

    def run_record(r):
        return {**{k: v for k, v in r.items() if k != "rows"}, "dir": os.path.relpath(r["dir"], out)}

    configs = [{"name": t["name"], "train_args": args_of.get(t["name"], []), "n": t["n"],
                "seeds": [r["seed"] for r in t["runs"]], "stats": t["stats"],
                "runs": [run_record(r) for r in t["runs"]]} for t in table]
    doc = {"seeds": seeds, "sd": "sample standard deviation (n - 1 in the denominator) over the "
           "seeds that finished; null when fewer than two did", "configs": configs}
    buf = io.StringIO()
    fields = ["config", "seed", "rc", "dir", "best_epoch", "epochs", *STAT_KEYS]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in configs:
        w.writerows({"config": c["name"], **r} for r in c["runs"])
    return (atomic_write_text(out / "report.json", json.dumps(doc, indent=2) + "\n"),
            atomic_write_text(out / "runs.csv", buf.getvalue()))


def write_report(args, out: Path, names, runs: list[dict]) -> Path:
    """OUT/report.md for the configurations `names` of an ablation run with `args`, whose runs
    (dicts with name, seed, dir and rc; one per configuration and seed) are `runs`; also
    OUT/report.json and OUT/runs.csv (write_results)."""
    from ..report import atomic_write_text, plot_confusion_matrix
    seeds = sorted({r["seed"] for r in runs}, key=lambda s: (s is None, s))
    table = summarise(runs, names)
    args_of = {n: a for n, _, a in CONFIGS}
    lines = _header(args, seeds)
    lines += _table_one_seed(table, args_of) if len(seeds) <= 1 else _table_seeds(table, args_of, out)
    lines += ["", "`split1` is also the dropout-0 and the SMART-off configuration.", ""]
    write_results(out, table, seeds)
    plots = make_plots(out, table)
    done = [t for t in table if not t.get("missing")]
    if done:
        best = max(done, key=lambda t: t["stats"]["mean_score"]["mean"])
        run = max((r for r in best["runs"] if not r.get("missing")), key=lambda r: r["mean_score"])
        text, m = sst_error_analysis(args.data_dir, Path(run["dir"]))
        which = best["name"] if len(seeds) <= 1 else f"{best['name']}, seed {run['seed']}"
        plots["SST dev confusion matrix of the best configuration"] = plot_confusion_matrix(
            m, out / "plots" / "sst_confusion_best.png", title=f"SST dev confusion ({which})")
        lines += ["## Plots", ""]
        for title, path in plots.items():
            lines += [f"**{title}**", "", f"![{title}]({path.relative_to(out)})", ""]
        if len(seeds) <= 1:
            lines += [f"## SST error analysis (best configuration: {best['name']}, "
                      f"mean {run['mean_score']:.3f})", "", text]
        else:
            lines += [f"## SST error analysis (best configuration: {best['name']}, mean "
                      f"{format_mean_sd(best['stats']['mean_score'])} over {best['n']} seeds; the "
                      f"predictions of its best seed, {run['seed']}, mean {run['mean_score']:.3f})", "", text]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
