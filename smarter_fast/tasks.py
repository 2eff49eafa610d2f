"""The three tasks of "SMARTer BERT", described once: every module that needs a task's name, data
files, head, loss, metric or output files reads them here.

- sst   (5-way sentiment):   cross-entropy on the (B, 5) logits, integer labels 0-4;
- quora (paraphrase, 0/1):   binary cross-entropy with logits on the (B,) logits;
- sts   (similarity, 0-5):   mean squared error of the (B,) raw scores against the 0-5 gold scores.

The names are written three ways elsewhere, all taken from here: the short task name (`sst`,
`quora`, `sts`: schedules, metrics.jsonl keys, the CS224N file names), the model head's name
(`sentiment`, `paraphrase`, `similarity`: the MultitaskBert module and its checkpoint tensors) and
the leaderboard's prediction-file prefix (`sst`, `para`, `sts`). The strings are file formats and
checkpoint keys, so they must not change.

This module imports torch only: data, model and evaluation code import it, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KINDS = ("classification", "binary", "regression")
METRICS = ("accuracy", "pearson")


def sst_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the 5 SST classes: logits (B, 5), labels (B,) int64 in 0-4; with
    `label_smoothing` e the target is (1 - e) on the gold class plus e / 5 on every class."""
    return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)


def quora_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits: logits (B,), labels (B,) 0/1."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def sts_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the 0-5 scale: scores (B,), labels (B,) floats in [0, 5]."""
    return F.mse_loss(scores.float(), labels.float())


@dataclass(frozen=True)
class Task:
    """One task. `kind` decides what its outputs are: classification (num_outputs logits,
    argmax, integer labels 0..num_outputs-1), binary (one logit, > 0 means 1) or regression (one
    raw score, labels in `label_range`)."""

    name: str                       # short name: schedules, metrics.jsonl keys, CS224N files
    title: str                      # for people: plots and messages
    head: str                       # MultitaskBert head module = checkpoint tensor prefix
    num_outputs: int                # the head's output width
    is_pair: bool                   # two sentences per example (token_type_ids, pair features)
    kind: str                       # one of KINDS
    file_pattern: str               # CS224N file name; {} = train | dev | test-student
    text_columns: tuple[str, ...]   # columns read as the sentence(s)
    label_column: str               # column of the gold label (absent in test-student files)
    label_range: tuple[float, float]  # gold labels lie in [low, high]
    loss: Callable                  # loss(output, labels) -> scalar tensor (mean over the batch)
    metric: str                     # one of METRICS, on the dev set
    metric_key: str                 # its key in metrics.jsonl / dev_metrics.json
    prediction_prefix: str          # leaderboard file {prefix}-{dev|test}-output.csv
    prediction_header: str          # that file's value column, spelled as the leaderboard expects
    output_names: tuple[str, ...]   # one per output, for people and exported model configs
    label_names: tuple[str, ...] = ()  # for people, by label value (classification and binary)

    @property
    def head_tensors(self) -> tuple[str, str]:
        """The head's tensor names in a checkpoint (MultitaskBert state_dict keys)."""
        return f"{self.head}.weight", f"{self.head}.bias"

    @property
    def metric_title(self) -> str:
        return f"{self.title} {'Pearson' if self.metric == 'pearson' else self.metric}"

    def file_name(self, split: str) -> str:
        """The CS224N file of `split` ('train', 'dev', 'test' or 'test-student')."""
        return self.file_pattern.format("test-student" if split == "test" else split)

    def prediction_file(self, split: str) -> str:
        """The leaderboard prediction file of `split` ('dev', 'test' or 'test-student')."""
        return f"{self.prediction_prefix}-{'test' if split == 'test-student' else split}-output.csv"


SST = Task(name="sst", title="SST", head="sentiment", num_outputs=5, is_pair=False,
           kind="classification", file_pattern="ids-sst-{}.csv", text_columns=("sentence",),
           label_column="sentiment", label_range=(0.0, 4.0), loss=sst_loss, metric="accuracy",
           metric_key="sst_acc", prediction_prefix="sst", prediction_header="Predicted_Sentiment",
           output_names=("very negative", "negative", "neutral", "positive", "very positive"),
           label_names=("very negative", "negative", "neutral", "positive", "very positive"))
QUORA = Task(name="quora", title="Quora", head="paraphrase", num_outputs=1, is_pair=True,
             kind="binary", file_pattern="quora-{}.csv", text_columns=("sentence1", "sentence2"),
             label_column="is_duplicate", label_range=(0.0, 1.0), loss=quora_loss, metric="accuracy",
             metric_key="quora_acc", prediction_prefix="para",
             prediction_header="Predicted_Is_Paraphrase", output_names=("is paraphrase",),
             label_names=("not a paraphrase", "paraphrase"))
STS = Task(name="sts", title="STS", head="similarity", num_outputs=1, is_pair=True,
           kind="regression", file_pattern="sts-{}.csv", text_columns=("sentence1", "sentence2"),
           label_column="similarity", label_range=(0.0, 5.0), loss=sts_loss, metric="pearson",
           metric_key="sts_pearson", prediction_prefix="sts",
           prediction_header="Predicted_Similiary",  # sic: the leaderboard's spelling
           output_names=("similarity",))

# The canonical order: data loading, schedules (baseline runs SST, then Quora, then STS), the
# metrics and the printed lines all follow it.
TASKS = (SST, QUORA, STS)
TASK_NAMES = tuple(t.name for t in TASKS)
METRIC_KEYS = tuple(t.metric_key for t in TASKS)  # the dev metrics.jsonl keys, one per task
# name -> Task, read by `task` on every call (tests swap an entry to inject a failing loss)
BY_NAME = {t.name: t for t in TASKS}


def task(name: str) -> Task:
    """The task called `name` ('sst', 'quora' or 'sts')."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}") from None


_task = task  # task_loss's argument `task` hides the function


def task_loss(task: str, output: torch.Tensor, labels: torch.Tensor, *,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """The loss of `task` ('sst', 'quora' or 'sts') for the model output and gold labels.
    `label_smoothing` applies to the SST cross-entropy only (the 5 sentiment classes are graded
    and neighbours are often confused by annotators)."""
    t = _task(task)
    if t.kind == "classification" and label_smoothing:
        return t.loss(output, labels, label_smoothing)
    return t.loss(output, labels)


__all__ = ["Task", "TASKS", "TASK_NAMES", "METRIC_KEYS", "BY_NAME", "SST", "QUORA", "STS", "KINDS", "METRICS", "task",
           "task_loss", "sst_loss", "quora_loss", "sts_loss"]
