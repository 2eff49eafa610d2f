"""`python -m smarter_fast.ablate` on tiny data with a tiny random BERT: every configuration
trains, report.md has the table, plots and error analysis, and a restart skips finished ones."""


import pytest

from smarter_fast.ablate import DEFAULT_NAMES, GROUPS, main

SIZES = {
    "sst": {"train": 12, "dev": 10, "test-student": 2},
    "quora": {"train": 16, "dev": 6, "test-student": 2},
    "sts": {"train": 8, "dev": 6, "test-student": 2},
}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_ablate", hidden_size=16, num_hidden_layers=1,
                         intermediate_size=32, max_position_embeddings=96)


def test_ablate_tiny_end_to_end_and_restart(tiny, tmp_path, capsys):
    ckpt, data = tiny
    out = tmp_path / "abl"
    argv = ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1", "--dev-limit", "8"]
    assert main(argv) == 0
    assert len((out / "_data" / "ids-sst-dev.csv").read_text().splitlines()) == 9  # header + 8
    report = (out / "report.md").read_text()
    for name in DEFAULT_NAMES:
        assert f"| {name} |" in report, name
        assert (out / name / "ablate_done.json").is_file()
    assert "failed" not in report
    for f in ("smart_learning_curves.png", "training_loss_per_schedule.png", "sst_confusion_best.png"):
        assert (out / "plots" / f).stat().st_size > 1000, f
    assert "## SST error analysis" in report and "Largest confusion cells" in report
    assert "Words most indicative" in report
    capsys.readouterr()
    # started again: nothing is retrained
    assert main(argv + ["--only", "baseline,pcgrad"]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 2


def test_ablate_rejects_unknown_config(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--only", "nope"]) == 2
    assert "unknown configuration" in capsys.readouterr().err


def test_recipe_search_group_with_time_budget_and_parallel_jobs(tiny, tmp_path, capsys):
    ckpt, data = tiny
    out = tmp_path / "search"
    two = ["recipe-report", "mc-pair-bi"]
    assert set(two) <= set(GROUPS["recipe"])
    argv = ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--time-budget", "0.003",
            "--batch-size", "4", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1",
            "--only", ",".join(two), "--jobs", "2", "--train-args", "--precision fp32"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "time budget 0.003 min" in report and "train min" in report
    for name in two:
        assert f"| {name} |" in report and (out / name / "ablate_done.json").is_file()
        log = (out / name / "train.log").read_text()
        assert "time budget of 0.003 min spent" in log
    assert "--recipe minilm-cpu --pair-features bi" in report
