"""The task registry (smarter_fast.tasks): consistent in itself, the strings that are file
formats unchanged, and every consumer (data, demo data, schedules, heads, checkpoints, SMART,
evaluation, reports) following it rather than spelling a task of its own."""

import ast
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from smarter_fast import tasks
from smarter_fast.tasks import QUORA, SST, STS, TASK_NAMES, TASKS, task, task_loss

REPO = Path(__file__).resolve().parents[1]


# ---- the registry itself ---------------------------------------------------------------------------
def test_names_heads_and_outputs_are_unique():
    for field in ("name", "title", "head", "file_pattern", "metric_key", "prediction_prefix",
                  "prediction_header", "label_column"):
        values = [getattr(t, field) for t in TASKS]
        assert len(set(values)) == len(values), field
    assert TASK_NAMES == tuple(t.name for t in TASKS) and (SST, QUORA, STS) == TASKS
    assert tasks.METRIC_KEYS == tuple(t.metric_key for t in TASKS)
    assert tasks.BY_NAME == {t.name: t for t in TASKS}


def test_the_file_formats_and_checkpoint_names_are_the_published_ones():
    # CS224N files, leaderboard files and headers (sic), checkpoint tensors and metrics keys are read
    # by other programs and by saved runs: a change here breaks them
    got = [(t.name, t.file_name("train"), t.file_name("test"), t.prediction_file("test-student"),
            t.prediction_header, t.head_tensors, t.metric_key, t.num_outputs, t.is_pair) for t in TASKS]
    assert got == [
        ("sst", "ids-sst-train.csv", "ids-sst-test-student.csv", "sst-test-output.csv",
         "Predicted_Sentiment", ("sentiment.weight", "sentiment.bias"), "sst_acc", 5, False),
        ("quora", "quora-train.csv", "quora-test-student.csv", "para-test-output.csv",
         "Predicted_Is_Paraphrase", ("paraphrase.weight", "paraphrase.bias"), "quora_acc", 1, True),
        ("sts", "sts-train.csv", "sts-test-student.csv", "sts-test-output.csv",
         "Predicted_Similiary", ("similarity.weight", "similarity.bias"), "sts_pearson", 1, True)]


@pytest.mark.parametrize("t", TASKS, ids=TASK_NAMES)
def test_each_task_is_consistent(t):
    assert t.kind in tasks.KINDS and t.metric in tasks.METRICS
    assert len(t.text_columns) == (2 if t.is_pair else 1)
    assert len(t.output_names) == t.num_outputs and len(set(t.output_names)) == t.num_outputs
    low, high = t.label_range
    if t.kind == "classification":  # one logit per class 0..n-1
        assert (low, high) == (0, t.num_outputs - 1) and t.metric == "accuracy"
    else:
        assert t.num_outputs == 1
    if t.kind == "binary":
        assert (low, high) == (0, 1) and t.metric == "accuracy"
    if t.kind == "regression":
        assert t.metric == "pearson"
    assert t.file_name("dev") == t.file_pattern.format("dev") != t.file_pattern
    # a name per label value: 0..n-1 classes, 0/1 for binary, none for a score
    n_labels = {"classification": t.num_outputs, "binary": 2, "regression": 0}[t.kind]
    assert len(t.label_names) == len(set(t.label_names)) == n_labels


def test_an_unknown_task_names_the_known_ones():
    for bad in ("nope", "sentiment", None):
        with pytest.raises(ValueError, match=r"unknown task .*; expected one of sst, quora, sts$"):
            task(bad)
    with pytest.raises(ValueError, match="expected one of sst, quora, sts"):
        task_loss("nope", torch.zeros(2), torch.zeros(2))
    assert task("quora") is QUORA


def test_task_loss_dispatches_through_the_registry(monkeypatch):
    import dataclasses
    calls = []
    monkeypatch.setitem(tasks.BY_NAME, "sts", dataclasses.replace(STS, loss=lambda o, y: calls.append(1)))
    task_loss("sts", torch.zeros(2), torch.zeros(2), label_smoothing=0.3)
    assert calls == [1]


# ---- data ------------------------------------------------------------------------------------------
def test_demo_data_writes_the_registry_files_and_columns(tmp_path):
    from smarter_fast.data.cs224n import read_task_file
    from smarter_fast.data.demo import DEFAULT_SIZES, write_demo_data

    sizes = {t.name: {"train": 7, "dev": 3, "test-student": 2} for t in TASKS}
    directory = write_demo_data(tmp_path / "demo", sizes=sizes)
    assert set(DEFAULT_SIZES) == set(TASK_NAMES)
    csvs = sorted(p.name for p in directory.glob("*.csv"))
    assert csvs == sorted(t.file_name(s) for t in TASKS for s in ("train", "dev", "test"))
    for t in TASKS:
        with open(directory / t.file_name("train"), newline="") as f:
            assert next(csv.reader(f, delimiter="\t")) == ["", "id", *t.text_columns, t.label_column]
        with open(directory / t.file_name("test"), newline="") as f:
            assert next(csv.reader(f, delimiter="\t")) == ["", "id", *t.text_columns]
        rows, report = read_task_file(directory / t.file_name("train"), t.name, strict=True)
        assert len(rows) == 7 and report.rows_skipped == 0
        label_type = float if t.kind == "regression" else int
        assert all(type(r.label) is label_type and t.label_range[0] <= r.label <= t.label_range[1]
                   for r in rows)
        assert all(hasattr(r, "sentence2") == t.is_pair for r in rows)


def test_reader_locates_and_splits_by_the_registry(tmp_path):
    from smarter_fast.data.cs224n import CS224NSplit, find_data_files, load_cs224n
    from smarter_fast.data.demo import write_demo_data

    directory = write_demo_data(tmp_path / "demo", sizes={t: {"train": 4, "dev": 5, "test-student": 0}
                                                           for t in TASK_NAMES})
    files = find_data_files(directory)
    assert list(files) == list(TASK_NAMES)
    assert all(files[t.name]["dev"].name == t.file_name("dev") for t in TASKS)
    # CS224NSplit is built positionally in registry order: its fields must be in that order
    fields = list(CS224NSplit.__dataclass_fields__)
    assert fields == ["split", *TASK_NAMES, "reports"]
    dev = load_cs224n(directory, "dev")
    assert [len(getattr(dev, t)) for t in TASK_NAMES] == [5, 5, 5]
    assert isinstance(dev.sst[0].label, int) and isinstance(dev.sts[0].label, float)


@pytest.mark.parametrize("t", TASKS, ids=TASK_NAMES)
def test_a_bad_label_is_reported_with_the_registry_column_and_range(tmp_path, t):
    from smarter_fast.data.cs224n import DataError, read_task_file

    bad = {"classification": "5", "binary": "0.5", "regression": "5.5"}[t.kind]
    path = tmp_path / t.file_name("train")
    path.write_text("\t".join(["", "id", *t.text_columns, t.label_column]) + "\n"
                    + "\t".join(["0", "a", *["some words"] * len(t.text_columns), bad]) + "\n")
    reason = {"classification": f"{t.label_column} not an integer 0-{t.num_outputs - 1}",
              "binary": f"{t.label_column} not 0 or 1",
              "regression": f"{t.label_column} out of range 0-5"}[t.kind]
    with pytest.raises(DataError, match=f"field '{t.label_column}': {reason}$"):
        read_task_file(path, t.name, strict=True)


def test_schedules_follow_the_registry_order():
    from smarter_fast.data.schedules import SPLIT_TASKS, TASK_ORDER, Schedule

    assert TASK_ORDER == TASK_NAMES
    assert all(set(v) <= set(TASK_NAMES) for v in SPLIT_TASKS.values())
    steps = Schedule("baseline", {t: [5] * 3 for t in TASK_NAMES}, 2).epoch_steps(0)
    assert list(dict.fromkeys(t for t, _ in steps)) == list(TASK_NAMES)


# ---- model -----------------------------------------------------------------------------------------
def small_model(pair_features="cross"):
    from smarter_fast.model import BertConfig, BertModel, MultitaskBert

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                     intermediate_size=13, max_position_embeddings=32)
    return MultitaskBert(BertModel(cfg), pair_features=pair_features).eval()


@pytest.mark.parametrize("pair_features", ["cross", "bi"])
def test_heads_have_the_registry_names_and_sizes(pair_features):
    from smarter_fast.model import heads

    model = small_model(pair_features)
    H = model.config.hidden_size
    assert heads.TASKS == tuple(t.head for t in TASKS)
    assert heads.PAIR_TASKS == tuple(t.head for t in TASKS if t.is_pair)
    assert heads.ALIASES == {t.name: t.head for t in TASKS}
    head_keys = [k for k in model.state_dict() if not k.startswith("bert.")]
    assert head_keys == [k for t in TASKS for k in t.head_tensors]
    for t in TASKS:
        layer = getattr(model, t.head)
        assert layer.out_features == t.num_outputs
        assert layer.in_features == (heads.pair_input_size(H, pair_features) if t.is_pair else H)
        pooled = torch.randn(3 * model.rows_per_example(t.name), H)
        out = model.head(t.name, pooled)
        assert out.shape == ((3, t.num_outputs) if t.num_outputs > 1 else (3,))
        assert torch.equal(out, model.head(t.head, pooled))  # the short name is the head's alias


def test_a_checkpoint_round_trips_the_registry_heads_and_names_a_missing_one(tmp_path):
    from safetensors.torch import load_file, save_file

    from smarter_fast.model import MultitaskBert

    model = small_model()
    model.save_pretrained(tmp_path / "ck")
    saved = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert {k for t in TASKS for k in t.head_tensors} <= set(saved)
    again = MultitaskBert.from_pretrained(tmp_path / "ck")
    for t in TASKS:
        assert torch.equal(getattr(again, t.head).weight, getattr(model, t.head).weight)
    del saved[STS.head_tensors[1]]
    save_file(saved, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"task heads incomplete, lacking \['similarity.bias'\]"):
        MultitaskBert.from_pretrained(tmp_path / "ck")


def test_smart_forward_uses_the_head_and_type_ids_of_the_registry():
    from smarter_fast.regularizers.smart import task_forward

    seen = []
    batch = {"input_ids": 1, "attention_mask": 2, "token_type_ids": 3}
    for t in TASKS:
        task_forward(lambda *a: seen.append(a), t.name, batch)
    assert seen == [(t.head, 1, 2, 3 if t.is_pair else None) for t in TASKS]


# ---- evaluation and reports ------------------------------------------------------------------------
@pytest.mark.parametrize("t", TASKS, ids=TASK_NAMES)
def test_prediction_files_are_the_registry_names_and_headers(tmp_path, t):
    from smarter_fast import evaluation

    for split in ("dev", "test-student"):
        path = evaluation.write_predictions(tmp_path, t.name, split, ["a"], [1])
        assert path.name == t.prediction_file(split)
        assert path.read_text().splitlines()[0] == f"id \t {t.prediction_header} "


def test_metrics_and_printed_lines_use_the_registry_keys(tmp_path):
    from smarter_fast.evaluation import compute_metrics, format_class_metrics
    from smarter_fast.report import format_metrics, plot_learning_curves

    rng = np.random.default_rng(0)
    gold = {"sst": rng.integers(0, 5, 20), "quora": rng.integers(0, 2, 20), "sts": rng.random(20) * 5}
    m = compute_metrics(gold, gold)
    assert list(m)[:3] == [t.metric_key for t in TASKS]
    assert [m[t.metric_key] for t in TASKS] == [1.0, 1.0, pytest.approx(1.0)]
    assert [k for k in m if k.endswith("_confusion")] == ["sst_confusion"]
    assert format_metrics(m).split()[::2] == [*tasks.METRIC_KEYS, "mean", "cs224n"]
    assert format_class_metrics(m) == f"sst_macro_f1 {m['sst_macro_f1']:.3f}"
    rows = [{"epoch": 1, **m, **{f"train_loss_{t}": 0.5 for t in TASK_NAMES}}]
    assert [p.name for p in plot_learning_curves(rows, tmp_path)] == ["training_loss.png", "dev_metrics.png"]


def test_symmetric_pair_metrics_are_given_for_the_pair_tasks_only(monkeypatch):
    import smarter_fast.evaluation as ev

    class Encoded:
        def __init__(self, t, labels):
            self.task, self.labels = t, labels

    class Model:
        pair_order = "symmetric"

    outputs = {"sst": np.eye(5)[[0, 1]], "quora": np.array([1.0, -1.0]), "sts": np.array([1.0, 2.0])}
    dev = {t: Encoded(t, np.array(v)) for t, v in (("sst", [0, 1]), ("quora", [1, 0]), ("sts", [1, 2]))}
    monkeypatch.setattr(ev, "model_outputs", lambda model, data, *a, **k: (outputs[data.task],) * 2)
    metrics, _ = ev.evaluate_dev(Model(), dev)
    assert [k for k in metrics if k.endswith("_given_order")] == [
        f"{t.metric_key}_given_order" for t in TASKS if t.is_pair]


# ---- no task spelled outside the registry ----------------------------------------------------------
def _registry_strings() -> set:
    out = set()
    for t in TASKS:
        out |= {t.name, t.head, t.prediction_prefix, t.prediction_header, t.file_pattern, t.metric_key,
                t.label_column, *t.head_tensors, *(t.file_name(s) for s in ("train", "dev", "test")),
                *(t.prediction_file(s) for s in ("dev", "test"))}
    return out


def _spelled(source: str) -> list:
    """(line, string) of every string literal in `source` that is a registry string."""
    words = _registry_strings()
    return sorted((n.lineno, n.value) for n in ast.walk(ast.parse(source))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in words)


def test_no_module_spells_a_task_string_of_its_own():
    """A string literal equal to a task's name, head, file, header or metric key, outside
    tasks.py, is a second spelling that can drift from the registry."""
    found = []
    for path in sorted([*(REPO / "smarter_fast").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        if path != REPO / "smarter_fast" / "tasks.py":
            found += [f"{path.relative_to(REPO)}:{line} {value!r}" for line, value in _spelled(path.read_text())]
    assert not found, "task strings outside smarter_fast/tasks.py:\n" + "\n".join(found)


def test_the_spelling_check_sees_a_spelled_task():
    source = 'x = {"para": 1}\ny = f"{x}" + "quora-dev.csv"\nz = "sst_acc is the SST accuracy"\n'
    assert _spelled(source) == [(1, "para"), (2, "quora-dev.csv")]


def test_tasks_imports_torch_and_the_standard_library_only():
    tree = ast.parse((REPO / "smarter_fast" / "tasks.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert modules <= {"__future__", "dataclasses", "typing", "torch"}, modules

