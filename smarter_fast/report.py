"""Plots and small output helpers shared by train and evaluate.

- learning curves from metrics.jsonl: mean training loss per task and dev metric per task, by epoch;
- the SST confusion matrix as PNG;
- atomic writes (tmp file + rename) for JSON and text files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .tasks import TASK_NAMES, TASKS

SST_LABELS = ["0 very neg", "1 neg", "2 neutral", "3 pos", "4 very pos"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def atomic_write_text(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_learning_curves(rows: list[dict], out_dir, title_suffix: str = "") -> list[Path]:
    """training_loss.png (mean loss per task by epoch, and the SMART term when present) and
    dev_metrics.png (SST acc, Quora acc, STS Pearson, mean score by epoch); by optimizer step
    when the rows carry one (--eval-every)."""
    if not rows:
        return []
    plt = _pyplot()
    out_dir = Path(out_dir)
    # with --eval-every, rows come every N optimizer steps: plot against the step
    by_step = all("step" in r for r in rows)
    epochs = [r["step"] if by_step else r["epoch"] for r in rows]
    xlabel = "optimizer step" if by_step else "epoch"
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in TASK_NAMES:
        ys = [r.get(f"train_loss_{task}") for r in rows]
        if any(y is not None for y in ys):
            ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=f"{task} loss")
    smart = [r.get("smart_term") for r in rows]
    if any(y is not None for y in smart):
        ax.plot(epochs, [np.nan if y is None else y for y in smart], marker="x", ls="--", label="SMART term")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean training loss")
    ax.set_title("Training loss per task" + title_suffix)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "training_loss.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (*((t.metric_key, t.metric_title) for t in TASKS), ("mean_score", "mean score")):
        ax.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", label=label,
                ls="--" if key == "mean_score" else "-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("dev metric")
    ax.set_title("Dev metrics per task" + title_suffix)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir / "dev_metrics.png"))
    plt.close(fig)
    return paths


def plot_confusion_matrix(matrix, path, title: str = "SST dev confusion matrix") -> Path:
    """Rows: gold class, columns: predicted class; counts written in the cells."""
    plt = _pyplot()
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    im = ax.imshow(m, cmap="Blues")
    n = m.shape[0]
    labels = SST_LABELS if n == len(SST_LABELS) else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    top = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                    color="white" if top and m[i, j] > top / 2 else "black")
    fig.colorbar(im, ax=ax)
    out = _save(fig, path)
    plt.close(fig)
    return out


def format_metrics(m: dict) -> str:
    """One line: 'sst_acc 0.512  quora_acc 0.801  sts_pearson 0.712  mean 0.675  cs224n 0.723'."""
    parts = [*(f"{t.metric_key} {m[t.metric_key]:.3f}" for t in TASKS), f"mean {m['mean_score']:.3f}",
             f"cs224n {m['cs224n_score']:.3f}"]
    return "  ".join(parts)


__all__ = ["atomic_write_text", "atomic_write_json", "read_metrics", "plot_learning_curves",
           "plot_confusion_matrix", "format_metrics", "SST_LABELS"]
