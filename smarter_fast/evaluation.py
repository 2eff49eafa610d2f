"""Evaluation of a MultitaskBert (or an Ensemble) on task data: outputs, metrics, the SST confusion
matrix and CS224N leaderboard prediction files. The command is smarter_fast.evaluate.

Metrics (dev): SST accuracy and macro-F1, Quora accuracy, STS Pearson correlation,
mean_score = mean(sst_acc, quora_acc, sts_pearson) and
cs224n_score = mean(sst_acc, quora_acc, (sts_pearson + 1) / 2).

Prediction files, named as in the CS224N starter (sst-dev-output.csv, sst-test-output.csv,
para-dev-output.csv, para-test-output.csv, sts-dev-output.csv, sts-test-output.csv), one per dev and
test-student split present: a header `id \\t Predicted_Sentiment` (`Predicted_Is_Paraphrase`,
`Predicted_Similiary` -- misspelt as the leaderboard expects), then `id , value` per example.

Inference runs in eval mode under torch.inference_mode with length-sorted batches (little padding).
A model trained with `--pair-order symmetric` (saved in its config.json) predicts each pair as the
mean of its outputs for (s1, s2) and (s2, s1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.batching import pad_batch
from .data.cs224n import load_cs224n, read_task_file
from .data.tokenize import encode_pairs, encode_sentences
from . import tasks as registry
from .report import atomic_write_json, atomic_write_text, plot_confusion_matrix

TASKS = registry.TASK_NAMES
N_SST = registry.SST.num_outputs
PRED_FILES = {t.name: t.prediction_prefix for t in registry.TASKS}
PRED_HEADERS = {t.name: t.prediction_header for t in registry.TASKS}
# Classification tasks also get a macro-F1 and a confusion matrix: metrics `<name>_macro_f1` and
# `<name>_confusion`, files predictions/<name>-dev-confusion.json and plots/<name>_confusion.png.
CLASS_TASKS = tuple(t for t in registry.TASKS if t.kind == "classification")


# ---- encoding ------------------------------------------------------------------------------------
class EncodedTask:
    """One task's examples tokenized: ids, type_ids, labels (None for test) and example ids.

    Pair tasks follow the model's `pair_features` layout: cross, one `[CLS] s1 [SEP] s2 [SEP]`
    sequence per example; bi, s1 and s2 tokenized separately (`[CLS] s [SEP]`) and a batch of B
    examples padded as 2B rows [s1 rows; s2 rows]; both, 3B rows [pair rows; s1 rows; s2 rows].
    `parts` holds one (ids, type_ids) per block; `ids` / `type_ids` are the first block's.
    `lengths` (for length bucketing): the pair length (cross, both), the longer sentence (bi).
    Labels stay one per example.
    both_orders (pair tasks): also encode every pair as (s2, s1) (`swapped_parts`, same layout), for
    pair_order "symmetric"; `batch(indices, swap=mask)` then takes the swapped form where mask is
    True."""

    def __init__(self, task: str, examples, tokenizer, pair_features: str = "cross",
                 both_orders: bool = False):
        from .model.heads import PAIR_FEATURES
        if pair_features not in PAIR_FEATURES:
            raise ValueError(f"pair_features must be one of {', '.join(PAIR_FEATURES)}, "
                             f"got {pair_features!r}")
        spec = registry.task(task)
        self.task, self.is_pair = task, spec.is_pair
        self.pair_features = pair_features if self.is_pair else "cross"
        self.example_ids = [e.id for e in examples]
        if not self.is_pair:
            self.parts = [encode_sentences(tokenizer, [e.sentence for e in examples])]
        else:
            s1, s2 = [e.sentence1 for e in examples], [e.sentence2 for e in examples]
            self.parts = []
            if self.pair_features in ("cross", "both"):
                self.parts.append(encode_pairs(tokenizer, s1, s2))
            if self.pair_features in ("bi", "both"):
                self.parts += [encode_sentences(tokenizer, s1), encode_sentences(tokenizer, s2)]
        self.swapped_parts = None
        if both_orders and self.is_pair:  # the cross block is encoded anew, the bi blocks swap
            self.swapped_parts = []
            if self.pair_features in ("cross", "both"):
                self.swapped_parts.append(encode_pairs(tokenizer, s2, s1))
            if self.pair_features in ("bi", "both"):
                self.swapped_parts += self.parts[-2:][::-1]
        self.ids, self.type_ids = self.parts[0]
        labels = [e.label for e in examples]
        self.labels = None if not labels or labels[0] is None else labels
        if self.labels is not None:
            dtype = np.int64 if spec.kind == "classification" else np.float32  # 0/1 too: BCE takes floats
            self.labels = np.asarray(self.labels, dtype=dtype)
        if self.pair_features == "bi":
            self.lengths = np.array([max(len(a), len(b)) for a, b in
                                     zip(self.parts[0][0], self.parts[1][0])], dtype=np.int64)
        else:
            self.lengths = np.array([len(x) for x in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rows_per_example(self) -> int:
        return len(self.parts)

    def batch(self, indices, pad_id: int = 0, swap=None) -> dict:
        """Padded batch of these examples (labels included when known): B rows, or 2B / 3B
        stacked rows for bi / both pairs, one padded batch. swap: per index, True takes the pair
        as (s2, s1) (needs both_orders); None: the given order."""
        swap = np.zeros(len(indices), bool) if swap is None else \
            np.broadcast_to(np.asarray(swap, dtype=bool), (len(indices),))
        if swap.any() and self.swapped_parts is None:
            raise ValueError(f"{self.task}: swapped pairs asked for but not encoded (both_orders=False)")
        blocks = zip(self.parts, self.swapped_parts or self.parts)
        rows = [(sw if s else part, i) for part, sw in blocks for i, s in zip(indices, swap)]
        ids = [src[0][i] for src, i in rows]
        type_ids = [src[1][i] for src, i in rows]
        b = pad_batch(ids, type_ids, None, pad_id=pad_id)
        if self.labels is not None:
            b["labels"] = torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])
        return b


def encode_split(split_data, tokenizer, pair_features: str = "cross",
                 both_orders: bool = False) -> dict[str, EncodedTask]:
    """CS224NSplit -> {task: EncodedTask}, pair tasks in the `pair_features` layout (and both
    orders with both_orders, for pair_order "symmetric")."""
    return {t: EncodedTask(t, getattr(split_data, t), tokenizer, pair_features, both_orders)
            for t in TASKS}


def encode_for(model, split_data, tokenizer) -> dict[str, EncodedTask]:
    """encode_split in the layout and pair orders `model` predicts from."""
    return encode_split(split_data, tokenizer, getattr(model, "pair_features", "cross"),
                        _symmetric(model))


def _symmetric(model) -> bool:
    return getattr(model, "pair_order", "given") == "symmetric"


def _check_layout(model, data: EncodedTask) -> None:
    """The batch layout of `data` must be the one the model splits its rows by."""
    model_pf = getattr(model, "pair_features", None)
    if data.is_pair and model_pf is not None and model_pf != data.pair_features:
        raise ValueError(f"{data.task} data encoded with pair_features={data.pair_features!r} but "
                         f"the model uses {model_pf!r}: encode with encode_split(..., "
                         f"pair_features=model.pair_features)")
    if _symmetric(model) and data.is_pair and data.swapped_parts is None:
        raise ValueError(f"{data.task} data encoded in one pair order but the model averages both "
                         f"(pair_order 'symmetric'): encode with encode_for(model, ...)")


# ---- inference -----------------------------------------------------------------------------------
class Ensemble:
    """Models evaluated as one: their raw outputs (SST and Quora logits, STS scores) averaged.
    Accepted wherever the functions below take a model; the members must share the pair input
    layout (pair_features, pair_order), since they read the same encoded batches."""

    def __init__(self, models):
        self.models = list(models)
        if not self.models:
            raise ValueError("an Ensemble needs at least one model")
        layouts = {(getattr(m, "pair_features", "cross"), getattr(m, "pair_order", "given"))
                   for m in self.models}
        if len(layouts) > 1:
            raise ValueError(f"ensemble members differ in (pair_features, pair_order): {sorted(layouts)}")
        (self.pair_features, self.pair_order), = layouts


def model_outputs(model, data: EncodedTask, batch_size: int = 64, device="cpu",
                  autocast_dtype=None, orders: bool = False, shard=None):
    """Raw model outputs for every example, in example order: (N, 5) SST logits, (N,) Quora
    logits, (N,) STS scores. Batches are cut from the examples sorted by length.
    For a model with pair_order "symmetric", pair outputs are the mean over both orders;
    orders=True returns (outputs, outputs of the given order alone) instead. An Ensemble gives
    the mean over its members."""
    if isinstance(model, Ensemble):
        outs = [model_outputs(m, data, batch_size, device, autocast_dtype, orders=True, shard=shard)
                for m in model.models]
        mean = np.mean([o[0] for o in outs], axis=0).astype(np.float32)
        given = np.mean([o[1] for o in outs], axis=0).astype(np.float32)
        return (mean, given) if orders else mean
    _check_layout(model, data)
    if _symmetric(model) and data.is_pair:
        given = _outputs(model, data, batch_size, device, autocast_dtype, False, shard)
        swapped = _outputs(model, data, batch_size, device, autocast_dtype, True, shard)
        mean = (given + swapped) / 2
        return (mean, given) if orders else mean
    out = _outputs(model, data, batch_size, device, autocast_dtype, None, shard)
    return (out, out) if orders else out


def sentence_embeddings(model, data: EncodedTask, batch_size: int = 64, device="cpu",
                        autocast_dtype=None) -> np.ndarray:
    """(N, H) pooled vectors (model.sentence_embedding) of single-sentence examples, in example
    order, from the same length-sorted batches as model_outputs."""
    if data.is_pair:
        raise ValueError(f"sentence embeddings are of single sentences; {data.task} holds pairs")
    if isinstance(model, Ensemble):
        raise ValueError("an ensemble has one embedding per member; embed with one checkpoint")
    if not len(data):
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return _outputs(model, data, batch_size, device, autocast_dtype, None,
                    forward=lambda ids, mask, _: model.sentence_embedding(ids, mask))


def _outputs(model, data: EncodedTask, batch_size, device, autocast_dtype, swap, shard=None,
             forward=None) -> np.ndarray:
    """shard: an object with rank(), world() and all_gather_object(obj) (the training
    application's `distributed` module under torchrun): this process runs every world()-th batch
    and the outputs are gathered (the same batches as in one process, so the same outputs).
    forward(input_ids, attention_mask, token_type_ids): what to compute per batch (default: the
    task's head output)."""
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    outs = [None] * len(order)
    spec = registry.task(data.task)
    rank, world = (shard.rank(), shard.world()) if shard is not None else (0, 1)
    try:
        with torch.inference_mode():
            for n_batch, start in enumerate(range(0, len(order), batch_size)):
                if n_batch % world != rank:
                    continue
                idx = order[start:start + batch_size]
                b = data.batch(idx, swap=swap)
                type_ids = b["token_type_ids"].to(device) if data.is_pair else None
                with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
                    y = (forward(ids, mask, type_ids) if forward is not None
                         else model(spec.head, ids, mask, type_ids))
                y = y.float().cpu().numpy()
                for k, i in enumerate(idx):
                    outs[i] = y[k]
    finally:
        model.train(was_training)
    if world > 1:
        mine = {int(i): o for i, o in enumerate(outs) if o is not None}
        for part in shard.all_gather_object(mine):
            for i, o in part.items():
                outs[i] = o
    if not outs:
        return np.zeros((0, spec.num_outputs) if spec.num_outputs > 1 else (0,), dtype=np.float32)
    return np.stack(outs)


def predictions_from_outputs(task: str, outputs: np.ndarray) -> np.ndarray:
    """SST: argmax class (int); Quora: 1 if logit > 0 (sigmoid > 0.5) else 0; STS: the score."""
    kind = registry.task(task).kind
    if kind == "classification":
        return outputs.argmax(axis=-1).astype(np.int64)
    if kind == "binary":
        return (outputs > 0).astype(np.int64)
    return outputs.astype(np.float64)


# ---- metrics -------------------------------------------------------------------------------------
def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else 0.0


def confusion_matrix(pred, gold, n_classes: int = N_SST) -> np.ndarray:
    """(n, n) counts: rows gold class, columns predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def macro_f1(pred, gold, n_classes: int = N_SST) -> float:
    """Unweighted mean over classes of F1 (a class with no gold and no predicted example counts 0,
    as in sklearn's zero_division=0)."""
    m = confusion_matrix(pred, gold, n_classes)
    tp = np.diag(m).astype(np.float64)
    denom = m.sum(axis=0) + m.sum(axis=1)  # predicted + gold = 2tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def pearson(pred, gold) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined correlation)."""
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(x) < 2:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


METRIC_FUNCTIONS = {"accuracy": accuracy, "pearson": pearson}


def combine(sst_acc: float, quora_acc: float, sts_pearson: float) -> dict:
    """The tasks' metrics under their keys, their mean, and the CS224N score (the mean with a
    Pearson correlation mapped from [-1, 1] to [0, 1])."""
    scores = (sst_acc, quora_acc, sts_pearson)  # in registry order
    unit = [(s + 1) / 2 if t.metric == "pearson" else s for t, s in zip(registry.TASKS, scores)]
    return {**{t.metric_key: s for t, s in zip(registry.TASKS, scores)},
            "mean_score": (scores[0] + scores[1] + scores[2]) / 3,
            "cs224n_score": (unit[0] + unit[1] + unit[2]) / 3}


def compute_metrics(preds: dict, gold: dict) -> dict:
    """preds/gold: {task: array} for sst (classes), quora (0/1), sts (scores)."""
    m = combine(*(METRIC_FUNCTIONS[t.metric](preds[t.name], gold[t.name]) for t in registry.TASKS))
    for t in CLASS_TASKS:
        m[f"{t.name}_macro_f1"] = macro_f1(preds[t.name], gold[t.name], t.num_outputs)
        m[f"{t.name}_confusion"] = confusion_matrix(preds[t.name], gold[t.name], t.num_outputs).tolist()
    return m


def format_class_metrics(metrics: dict) -> str:
    """'sst_macro_f1 0.302': the printed macro-F1 of the classification tasks."""
    return "  ".join(f"{t.name}_macro_f1 {metrics[f'{t.name}_macro_f1']:.3f}" for t in CLASS_TASKS)


def evaluate_dev(model, dev: dict[str, EncodedTask], batch_size: int = 64, device="cpu",
                 autocast_dtype=None, shard=None) -> tuple[dict, dict]:
    """(metrics, predictions per task) on the dev sets. A model with pair_order "symmetric" also
    reports quora_acc_given_order / sts_pearson_given_order (the given order alone). shard (see
    _outputs): every rank evaluates its share of the batches (all ranks must call)."""
    outs = {t: model_outputs(model, dev[t], batch_size, device, autocast_dtype, orders=True, shard=shard)
            for t in TASKS}
    preds = {t: predictions_from_outputs(t, outs[t][0]) for t in TASKS}
    metrics = compute_metrics(preds, {t: dev[t].labels for t in TASKS})
    if _symmetric(model):  # pair tasks only: a single sentence has one order
        for t in registry.TASKS:
            if t.is_pair:
                given = predictions_from_outputs(t.name, outs[t.name][1])
                metrics[f"{t.metric_key}_given_order"] = METRIC_FUNCTIONS[t.metric](given, dev[t.name].labels)
    return metrics, preds


# ---- files ---------------------------------------------------------------------------------------
def format_value(task: str, value) -> str:
    return f"{float(value):.4f}" if registry.task(task).kind == "regression" else str(int(value))


def write_predictions(out_dir, task: str, split: str, example_ids, preds) -> Path:
    """Writes `{sst|para|sts}-{dev|test}-output.csv` in the leaderboard format."""
    return write_prediction_file(Path(out_dir) / registry.task(task).prediction_file(split), task,
                                 example_ids, preds)


def write_prediction_file(path, task: str, example_ids, preds) -> Path:
    """A leaderboard-format file: a header `id \t <the task's column>`, then `id , value` rows."""
    spec = registry.task(task)
    lines = [f"id \t {spec.prediction_header} "]
    lines += [f"{i} , {format_value(task, v)} " for i, v in zip(example_ids, preds)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_predictions(path) -> dict[str, str]:
    """{id: value string} from a prediction file (for tests and checks)."""
    rows = Path(path).read_text().splitlines()
    return {k.strip(): v.strip() for k, v in (r.split(",", 1) for r in rows[1:] if r.strip())}


def evaluate_file(model, tokenizer, task: str, path, out_dir, batch_size: int = 64, device="cpu",
                  autocast_dtype=None) -> tuple[dict, list[Path]]:
    """One CS224N-format file of `task` -> (metrics, files written). Metrics (the task's metric,
    a classification task's macro-F1, a symmetric model's given-order metric) when the file has
    labels, then out_dir/<stem>-metrics.json; always the prediction file, in out_dir/predictions,
    named as the leaderboard's for a CS224N dev or test-student file, else <stem>-output.csv."""
    spec = registry.task(task)
    examples, _ = read_task_file(path, task)  # labels where the header has the column
    data = EncodedTask(task, examples, tokenizer, getattr(model, "pair_features", "cross"),
                       _symmetric(model))
    outputs, given = model_outputs(model, data, batch_size, device, autocast_dtype, orders=True)
    preds = predictions_from_outputs(task, outputs)
    path, out_dir = Path(path), Path(out_dir)
    split = next((s for s in ("dev", "test") if path.name == spec.file_name(s)), None)
    target = out_dir / "predictions" / (spec.prediction_file(split) if split else f"{path.stem}-output.csv")
    written = [write_prediction_file(target, task, data.example_ids, preds)]
    metrics = {}
    if data.labels is not None:
        score = METRIC_FUNCTIONS[spec.metric]
        metrics[spec.metric_key] = score(preds, data.labels)
        if spec.kind == "classification":
            metrics[f"{spec.name}_macro_f1"] = macro_f1(preds, data.labels, spec.num_outputs)
        if _symmetric(model) and spec.is_pair:
            metrics[f"{spec.metric_key}_given_order"] = score(predictions_from_outputs(task, given),
                                                              data.labels)
        written.append(atomic_write_json(out_dir / f"{path.stem}-metrics.json", metrics))
    return metrics, written


def write_evaluation(model, tokenizer, data_dir, out_dir, batch_size: int = 64, device="cpu",
                     autocast_dtype=None, dev: dict | None = None, title_suffix: str = "",
                     dev_result: tuple | None = None) -> dict:
    """Dev metrics + prediction files for every dev and test-student split present in data_dir,
    the SST confusion matrix as JSON and PNG, and dev_metrics.json in out_dir. Returns the metrics.
    `dev_result` = (metrics, predictions) from evaluate_dev on this model skips the dev pass.
    Data is encoded in the model's pair_features layout (`dev`, when given, must be too)."""
    out_dir = Path(out_dir)
    pred_dir = out_dir / "predictions"
    if dev is None:
        dev = encode_for(model, load_cs224n(data_dir, "dev"), tokenizer)
    if dev_result is not None:  # (metrics, predictions) already computed for this very model
        metrics, preds = dev_result
    else:
        metrics, preds = evaluate_dev(model, dev, batch_size, device, autocast_dtype)
    for t in TASKS:
        write_predictions(pred_dir, t, "dev", dev[t].example_ids, preds[t])
    test = encode_for(model, load_cs224n(data_dir, "test"), tokenizer)
    for t in TASKS:
        if len(test[t]):
            p = predictions_from_outputs(t, model_outputs(model, test[t], batch_size, device, autocast_dtype))
            write_predictions(pred_dir, t, "test", test[t].example_ids, p)
    for t in CLASS_TASKS:
        matrix = metrics[f"{t.name}_confusion"]
        atomic_write_json(pred_dir / f"{t.name}-dev-confusion.json",
                          {"rows": "gold class", "columns": "predicted class", "matrix": matrix})
        plot_confusion_matrix(matrix, out_dir / "plots" / f"{t.name}_confusion.png",
                              title=f"{t.title} dev confusion matrix" + title_suffix)
    atomic_write_json(out_dir / "dev_metrics.json", metrics)
    return metrics
