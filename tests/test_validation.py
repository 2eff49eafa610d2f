"""Validation: CLI arguments, missing data, malformed rows (skip reports and --strict), bad checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest

from smarter_fast.data.cs224n import DataError, find_data_files, read_quora, read_sst, read_sts
from smarter_fast.data.demo import write_demo_data
from smarter_fast.train import main

REPO = Path(__file__).resolve().parents[1]
REAL = Path("/work/shared/data/cs224n")


@pytest.mark.parametrize("argv,message", [
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--max-nonfinite", "x"], "--max-nonfinite must be a whole number"),
    (["--batch-size", "-2"], "--batch-size must be >= 1"),
    (["--seed", "abc"], "invalid int value"),
    (["--lr", "nan"], "--lr must be finite"),
    (["--smart-sigma", "-1"], "--smart-sigma must be >= 0"),
    (["--max-length", "4096"], "--max-length must be <= 512"),
    (["--precision", "fp8"], "invalid choice"),
    (["--pretrained", "/nonexistent/dir"], "directory not found"),
])
def test_argument_errors_are_one_clean_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("python -m smarter_fast.train: error:")]) == 1


def test_bad_checkpoint_directories(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["--pretrained", str(empty)])
    assert "lacks config.json, vocab.txt, model.safetensors or pytorch_model.bin" in capsys.readouterr().err
    notbert = tmp_path / "notbert"
    notbert.mkdir()
    (notbert / "config.json").write_text('{"model_type": "gpt2"}')
    (notbert / "vocab.txt").write_text("[PAD]\n")
    (notbert / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        main(["--pretrained", str(notbert)])
    assert "not a BERT checkpoint" in capsys.readouterr().err


def test_corrupt_weights_give_one_line(tmp_path):
    import json
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "intermediate_size": 64,
                                                 "vocab_size": 8}))
    (bad / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]) + "\n")
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    data = write_demo_data(tmp_path / "data", sizes={t: {"train": 4, "dev": 4, "test-student": 0} for t in ("sst", "quora", "sts")})
    p = subprocess.run([sys.executable, "-m", "smarter_fast.train", "--pretrained", str(bad), "--data-dir", str(data),
                        "--out", str(tmp_path / "o"), "--epochs", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"error: cannot load the checkpoint in {bad}" in p.stderr


def test_missing_file_lists_what_was_expected(tmp_path):
    data = write_demo_data(tmp_path / "data", sizes={t: {"train": 4, "dev": 4, "test-student": 0} for t in ("sst", "quora", "sts")})
    (data / "sts-dev.csv").unlink()
    with pytest.raises(DataError, match=r"lacks sts-dev.csv; expected ids-sst-\{train,dev\}.csv, quora-"):
        find_data_files(data)
    p = subprocess.run([sys.executable, "-m", "smarter_fast.train", "--data-dir", str(data), "--out",
                        str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "lacks sts-dev.csv" in p.stderr


def _write(path, header, rows):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def test_out_of_range_labels_are_malformed_rows(tmp_path, caplog):
    sst = _write(tmp_path / "ids-sst-train.csv", ["", "id", "sentence", "sentiment"],
                 [["0", "a", "good", "4"], ["1", "b", "bad", "7"], ["2", "c", "meh", "-1"], ["3", "d", "ok", "2.5"]])
    ex, rep = read_sst(sst)
    assert [e.id for e in ex] == ["a"]
    assert rep.messages() == ["skipped 3 of 4 rows in ids-sst-train.csv: sentiment not an integer 0-4 (lines 3, 4, 5)"]
    assert rep.rows_kept + rep.rows_skipped == rep.rows_read
    with pytest.raises(DataError, match=r"ids-sst-train.csv: line 3: field 'sentiment': sentiment not an integer 0-4"):
        read_sst(sst, strict=True)
    sts = _write(tmp_path / "sts-train.csv", ["", "id", "sentence1", "sentence2", "similarity"],
                 [["0", "a", "x", "y", "5.5"], ["1", "b", "x", "y", "3.0"]])
    assert read_sts(sts)[1].messages() == ["skipped 1 of 2 rows in sts-train.csv: similarity out of range 0-5 (lines 2)"]
    quora = _write(tmp_path / "quora-train.csv", ["", "id", "sentence1", "sentence2", "is_duplicate"],
                   [["0", "a", "x", "y", "2"], ["1", "b", "x", "y", "1.0"]])
    assert read_quora(quora)[1].messages() == ["skipped 1 of 2 rows in quora-train.csv: is_duplicate not 0 or 1 (lines 2)"]


@pytest.mark.skipif(not (REAL / "quora-train.csv").is_file(), reason="real CS224N data not available")
def test_real_malformed_quora_rows():
    ex, rep = read_quora(REAL / "quora-train.csv")
    msgs = rep.messages()
    assert msgs and all(m.startswith("skipped 1 of ") and " rows in quora-train.csv: " in m for m in msgs)
    assert rep.rows_kept + rep.rows_skipped == rep.rows_read == len(ex) + rep.rows_skipped
    with pytest.raises(DataError, match=r"quora-train.csv: line \d+: field '\w+': "):
        read_quora(REAL / "quora-train.csv", strict=True)


def test_strict_flag_reaches_the_readers(tmp_path):
    data = write_demo_data(tmp_path / "data", sizes={t: {"train": 4, "dev": 4, "test-student": 0} for t in ("sst", "quora", "sts")})
    f = data / "ids-sst-train.csv"
    f.write_text(f.read_text() + "99\tbad-id\tsome text\t9\n")
    p = subprocess.run([sys.executable, "-m", "smarter_fast.train", "--data-dir", str(data), "--strict",
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "ids-sst-train.csv: line 6: field 'sentiment': sentiment not an integer 0-4" in p.stderr
