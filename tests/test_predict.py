"""The predict command (stdin, files, both output formats, skip reports, refusals) and evaluate's
--task/--file and --device."""

import io
import json
import sys

import pytest
import torch

from smarter_fast import tasks as registry
from smarter_fast.evaluate import main as evaluate_main
from smarter_fast.evaluation import read_predictions
from smarter_fast.predict import main as predict_main



SIZES = {"sst": {"train": 3, "dev": 23, "test-student": 7},
         "quora": {"train": 3, "dev": 19, "test-student": 6},
         "sts": {"train": 3, "dev": 17, "test-student": 5}}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, name="tiny_predict")


@pytest.fixture(scope="module")
def ckpt(tiny, make_head_checkpoint):
    return make_head_checkpoint(tiny[0], "cls", "cross", "symmetric")


def stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_plain_lines_from_stdin_give_a_label_and_probabilities(ckpt, monkeypatch, capsys):
    stdin(monkeypatch, b"a gorgeous, witty film\nflat\n")
    assert predict_main(["--checkpoint", str(ckpt), "--task", "sst", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"]
    for r in rows:
        assert set(r) == {"id", "label", "label_name", "probabilities"}
        assert r["label_name"] == registry.SST.label_names[r["label"]]
        assert abs(sum(r["probabilities"]) - 1) < 1e-6
    assert "predicted 2 SST row(s)" in err


def test_bad_rows_are_reported_not_dropped_silently(ckpt, monkeypatch, capsys):
    stdin(monkeypatch, b"a\tb\nonly one\n\tx\nc\td\n")
    assert predict_main(["--checkpoint", str(ckpt), "--task", "quora", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["0", "3"] and {"probability", "label"} <= set(rows[0])
    assert "skipped 1 of 4 rows in <stdin>: expected sentence1 and sentence2 separated by a tab" in err
    assert "skipped 1 of 4 rows in <stdin>: empty sentence1 (lines 3)" in err
    assert "2 skipped" in err
    stdin(monkeypatch, b"only\n")
    assert predict_main(["--checkpoint", str(ckpt), "--task", "sts", "--device", "cpu"]) == 2
    assert "none of its 1 rows is usable" in capsys.readouterr().err
    stdin(monkeypatch, b"a\t\n")
    assert predict_main(["--checkpoint", str(ckpt), "--task", "sts", "--strict"]) == 2
    assert "<stdin>: line 1: field 'sentence2': empty sentence2" in capsys.readouterr().err


@pytest.mark.parametrize("t", registry.TASKS, ids=registry.TASK_NAMES)
def test_cs224n_format_on_a_dev_file_is_what_evaluate_writes(tiny, ckpt, tmp_path, t):
    _, data_dir = tiny
    assert evaluate_main(["--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--out",
                          str(tmp_path / "eval"), "--device", "cpu"]) == 0
    out = tmp_path / "pred.csv"
    assert predict_main(["--checkpoint", str(ckpt), "--task", t.name, "--input",
                         str(data_dir / t.file_name("dev")), "--format", "cs224n", "--output", str(out)]) == 0
    expected = tmp_path / "eval" / "predictions" / t.prediction_file("dev")
    assert out.read_text() == expected.read_text()
    assert len(read_predictions(out)) == SIZES[t.name]["dev"]


def test_jsonl_input_to_a_file_keeps_its_ids(ckpt, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "p1", "sentence1": "a cat", "sentence2": "the cat"}\n'
                   '{"id": "p2", "sentence1": "x", "sentence2": "y z"}\n')
    out = tmp_path / "out" / "scores.jsonl"
    assert predict_main(["--checkpoint", str(ckpt), "--task", "sts", "--input", str(src),
                         "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p1", "p2"] and all(isinstance(r["score"], float) for r in rows)
    assert f"wrote {out}" in capsys.readouterr().err


def test_refusals_are_clear(tiny, ckpt, tmp_path, monkeypatch, capsys):
    stdin(monkeypatch, b"a\n")
    assert predict_main(["--checkpoint", str(tmp_path / "absent"), "--task", "sst"]) == 2
    assert "not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        stdin(monkeypatch, b"a\n")
        assert predict_main(["--checkpoint", str(ckpt), "--task", "sst", "--device", "cuda"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
        _, data_dir = tiny
        assert evaluate_main(["--checkpoint", str(ckpt), "--data-dir", str(data_dir),
                              "--device", "cuda"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", str(ckpt), "--task", "nli"])


def test_evaluate_one_file_gives_the_data_dir_metric_and_file(tiny, ckpt, tmp_path, capsys):
    _, data_dir = tiny
    assert evaluate_main(["--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--out",
                          str(tmp_path / "all"), "--device", "cpu"]) == 0
    full = json.loads((tmp_path / "all" / "dev_metrics.json").read_text())
    for t in registry.TASKS:
        dev = data_dir / t.file_name("dev")
        assert evaluate_main(["--checkpoint", str(ckpt), "--task", t.name, "--file", str(dev),
                              "--out", str(tmp_path / "one")]) == 0
        metrics = json.loads((tmp_path / "one" / f"{dev.stem}-metrics.json").read_text())
        assert metrics[t.metric_key] == pytest.approx(full[t.metric_key], abs=1e-9)
        name = t.prediction_file("dev")
        assert (tmp_path / "one" / "predictions" / name).read_text() == \
            (tmp_path / "all" / "predictions" / name).read_text()
    test = data_dir / registry.SST.file_name("test")  # no labels: predictions only
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(ckpt), "--task", "sst", "--file", str(test),
                          "--out", str(tmp_path / "one")]) == 0
    assert "no labels, no metrics" in capsys.readouterr().out
    assert (tmp_path / "one" / "predictions" / registry.SST.prediction_file("test")).is_file()
    for bad in (["--task", "sst"], ["--file", str(test)]):
        with pytest.raises(SystemExit):
            evaluate_main(["--checkpoint", str(ckpt), *bad, *([] if "--file" in bad else ["--data-dir", str(data_dir)])])
