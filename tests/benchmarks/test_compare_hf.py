"""benchmarks/compare_hf.py on a tiny random BERT and SYNTHETIC CS224N-format data: both systems
run for 2 seeds x 1 epoch, the summary holds mean ± sd per epoch side by side, a second
invocation reuses the finished runs, results of other settings are refused, and the plain
pipeline is deterministic per seed."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_hf.py"
SIZES = {"sst": {"train": 24, "dev": 10, "test-student": 4},
         "quora": {"train": 16, "dev": 10, "test-student": 4},
         "sts": {"train": 16, "dev": 10, "test-student": 4}}

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_compare_hf")


def argv(tiny, out, *extra):
    """The comparison on the tiny data; ours with the reference (pure torch) kernels, so the test
    needs no C++ extension build (the tool is under test here, not the kernels)."""
    ckpt, data = tiny
    return ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--seeds", "2",
            "--epochs", "1", "--split-parts", "2", "--num-threads", "1", "--lr", "1e-4",
            "--ours-args", "--backend ref", *extra]


def test_compare_both_systems_reuse_and_refuse(compare, tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main(argv(tiny, out)) == 0
    first = capsys.readouterr().out
    assert "machine: " in first and "torch " in first  # the CPU model and torch version
    doc = json.loads((out / "summary.json").read_text())
    assert doc["machine"]["torch"] and doc["machine"]["cpu_model"]
    assert doc["seeds"] == [0, 1] and doc["failures"] == [] and doc["reused"] == []
    for system in ("ours", "hf"):
        assert sorted(doc["runs"][system]) == ["0", "1"]
        for seed in ("0", "1"):
            run = doc["runs"][system][seed]
            assert len(run["epochs"]) == 1 and run["wall_seconds"] > 0
            for key in ("sst_acc", "quora_acc", "sts_pearson", "mean_score"):
                assert 0.0 <= run["epochs"][0][key] <= 1.0 or key == "sts_pearson"
    (row,) = doc["summary"]["epochs"]
    for system in ("ours", "hf"):
        for key in ("sst_acc", "quora_acc", "sts_pearson", "mean_score"):
            cell = row[system][key]
            assert cell["n"] == 2 and cell["sd"] is not None and cell["mean"] is not None
        assert row[system]["seeds"] == [0, 1]
    # the plain pipeline saw the package's tokens
    hf0 = json.loads((out / "hf" / "seed0" / "result.json").read_text())
    assert set(hf0["examples_tokenized_unlike_ours"].values()) == {0}
    # the markdown table: one row per epoch, ours and hf side by side, mean ± sd
    md = (out / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| epoch"))
    for name in ("sst", "quora", "sts", "mean"):
        assert f"{name} ours" in header and f"{name} hf" in header
    epoch_row = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert epoch_row.count("±") == 8 and "n/a" not in epoch_row
    assert "| ours | 2 |" in md and "| hf | 2 |" in md
    assert doc["summary"]["timing"]["ours"]["with_extension_build"] == []  # --backend ref builds nothing

    # a second invocation reuses every finished run (nothing trains again)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/result.json")}
    log_size = (out / "ours" / "seed0" / "train.log").stat().st_size
    assert len(stamps) == 4
    assert compare.main(argv(tiny, out)) == 0
    second = capsys.readouterr().out
    assert "reused finished runs: ours seed 0, hf seed 0, ours seed 1, hf seed 1" in second
    assert "[ours seed" not in second and "[hf seed" not in second  # no run started
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "ours" / "seed0" / "train.log").stat().st_size == log_size
    assert json.loads((out / "summary.json").read_text())["summary"] == doc["summary"]

    # results of other settings are refused, not mixed in
    assert compare.main(argv(tiny, out, "--hf-eps", "1e-8", "--only", "hf")) == 2
    assert "other settings" in capsys.readouterr().err

    # an unfinished run of ours (no result.json, a checkpoint in its directory) continues with --resume
    first_result = json.loads((out / "ours" / "seed1" / "result.json").read_text())
    (out / "ours" / "seed1" / "result.json").unlink()
    assert compare.main(argv(tiny, out, "--only", "ours")) == 0
    third = capsys.readouterr().out
    assert "--seed 1" in third and "--resume" in third and "reused finished runs: ours seed 0" in third
    resumed = json.loads((out / "ours" / "seed1" / "result.json").read_text())
    assert resumed["epochs"] == first_result["epochs"]
    assert len(resumed["attempts"]) == 2 and resumed["attempts"][1]["resumed"]


def test_hf_pipeline_is_deterministic_per_seed(compare, tiny, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert compare.main(argv(tiny, tmp_path / name, "--only", "hf", "--seeds", "1",
                                 "--hf-batching", "length", "--hf-dropout-on-heads", "0.1")) == 0
        runs.append(json.loads((tmp_path / name / "hf" / "seed0" / "result.json").read_text()))
    a, b = ([{k: v for k, v in r.items() if "seconds" not in k} for r in run["epochs"]] for run in runs)
    assert a == b
    assert runs[0]["settings"]["batching"] == "length"
