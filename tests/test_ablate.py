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


def _argv(tiny, out, *extra):
    ckpt, data = tiny
    return ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1",
            "--only", "baseline", *extra]


def test_restart_with_other_settings_trains_afresh_and_keeps_the_old_outputs(tiny, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(_argv(tiny, out, "--dev-limit", "4")) == 0
    assert len((out / "baseline" / "predictions" / "sst-dev-output.csv").read_text().splitlines()) == 1 + 4
    capsys.readouterr()
    # another --dev-limit: the same argv (--data-dir is the _data copy), other data
    assert main(_argv(tiny, out, "--dev-limit", "6")) == 0
    said = capsys.readouterr().out
    assert "done already" not in said and "training afresh" in said
    assert len((out / "baseline" / "predictions" / "sst-dev-output.csv").read_text().splitlines()) == 1 + 6
    old = list(tmp_path.glob("abl/baseline.replaced-*"))
    assert len(old) == 1 and (old[0] / "metrics.jsonl").is_file()
    # the same settings again: skipped
    assert main(_argv(tiny, out, "--dev-limit", "6")) == 0
    assert "done already, skipped" in capsys.readouterr().out


def test_failed_configuration_is_reported_failed_with_its_error_in_its_log(tiny, tmp_path, monkeypatch):
    import smarter_fast.train as train
    out = tmp_path / "abl"
    assert main(_argv(tiny, out)) == 0  # a finished run whose rows stay on disk

    def broken(argv):
        print("error: something went wrong", file=__import__("sys").stderr)
        return 2

    monkeypatch.setattr(train, "main", broken)
    assert main(_argv(tiny, out, "--limit", "9")) == 1  # other settings: retrained, and it fails
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "failed (rc 2)" in report
    assert "error: something went wrong" in (out / "baseline" / "train.log").read_text()


def test_dev_limit_copies_rows_as_bytes(tmp_path):
    from smarter_fast.ablate import limited_data
    src = tmp_path / "src"
    src.mkdir()
    files = {"ids-sst-train.csv": "id\tsentence\tsentiment\n", "ids-sst-dev.csv": "id\tsentence\tsentiment\n",
             "quora-train.csv": "id\tsentence1\tsentence2\tis_duplicate\n",
             "quora-dev.csv": "id\tsentence1\tsentence2\tis_duplicate\n",
             "sts-train.csv": "id\tsentence1\tsentence2\tsimilarity\n",
             "sts-dev.csv": "id\tsentence1\tsentence2\tsimilarity\n"}
    for name, header in files.items():
        rows = [f"{i}\tgood row {i}\t{i % 2}\n".encode() for i in range(4)]
        rows[1] = b"1\tbad \xff byte\t0\n"  # invalid UTF-8: the readers skip it, with its line
        (src / name).write_bytes(header.encode() + b"".join(rows))
    dst = limited_data(src, tmp_path / "dst", None, 2)
    assert (dst / "ids-sst-dev.csv").read_bytes() == (src / "ids-sst-dev.csv").read_bytes().splitlines(True)[0] \
        + b"".join((src / "ids-sst-dev.csv").read_bytes().splitlines(True)[1:3])
    assert (dst / "quora-train.csv").read_bytes() == (src / "quora-train.csv").read_bytes()
