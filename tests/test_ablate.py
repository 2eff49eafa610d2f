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


# ---- --seeds: every configuration trained with several seeds, the report's mean ± sd -------------------
def test_mean_sd_is_the_sample_standard_deviation_and_one_value_has_none():
    from smarter_fast.training.ablation import format_mean_sd, mean_sd
    s = mean_sd([0.5, 0.6, 0.7, 0.9])
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.675)
    # n - 1 in the denominator: sqrt(0.0875 / 3), not the population sqrt(0.0875 / 4)
    assert s["sd"] == pytest.approx((0.0875 / 3) ** 0.5)
    assert format_mean_sd(s) == "0.675 ± 0.171"
    assert mean_sd([0.8, 0.6])["sd"] == pytest.approx(0.1414213562)
    one = mean_sd([0.42])
    assert one == {"mean": 0.42, "sd": None, "n": 1} and format_mean_sd(one) == "0.420 ± -"
    assert mean_sd([]) == {"mean": None, "sd": None, "n": 0} and format_mean_sd(mean_sd([])) == ""


def _fake_run(d, scores):
    """A run directory whose metrics.jsonl has one row per epoch with these dev mean scores (the
    task metrics derived from them)."""
    import json
    d.mkdir(parents=True)
    rows = [{"epoch": e + 1, "mean_score": m, "sst_acc": m - 0.1, "quora_acc": m + 0.1, "sts_pearson": m,
             "cs224n_score": m + 0.05, "train_seconds": 10.0 * (e + 1), "train_examples": 100,
             "train_loss_sst": 1.0, "train_loss_quora": 0.5, "train_loss_sts": 0.25}
            for e, m in enumerate(scores)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_seeds_aggregate_per_configuration_in_table_json_and_csv(tmp_path):
    import csv
    import json

    from smarter_fast.training.ablation import _table_seeds, seed_dir, summarise, write_results
    out = tmp_path
    runs = []
    for name, seeds in (("baseline", {1: [0.50, 0.60], 2: [0.70, 0.65], 3: [0.9]}),
                        ("split1", {1: [0.40], 2: [0.55], 3: [0.3]})):
        for seed, scores in seeds.items():
            _fake_run(seed_dir(out, name, seed, 3), scores)
            failed = name == "split1" and seed == 3
            runs.append({"name": name, "seed": seed, "dir": seed_dir(out, name, seed, 3), "rc": 2 if failed else 0})
    table = summarise(runs, ["baseline", "split1"])
    base, split = table
    # baseline: best epochs 0.60, 0.70, 0.90 -> mean 0.7333, sample sd 0.1528
    assert base["n"] == 3 and [r["best_epoch"] for r in base["runs"]] == [2, 1, 1]
    assert base["stats"]["mean_score"]["mean"] == pytest.approx(0.7333333)
    assert base["stats"]["mean_score"]["sd"] == pytest.approx(0.1527525)
    assert base["stats"]["sst_acc"]["mean"] == pytest.approx(0.6333333)
    # seconds per epoch: (10 + 20) / 2 for the two-epoch runs, 10 for the one-epoch run
    assert base["stats"]["seconds_per_epoch"]["mean"] == pytest.approx((15 + 15 + 10) / 3)
    # split1's third seed failed in this session: left out (n = 2), whatever it left on disk
    assert split["n"] == 2 and split["runs"][2]["missing"] and split["runs"][2]["rc"] == 2
    assert split["stats"]["mean_score"]["mean"] == pytest.approx(0.475)
    assert split["stats"]["mean_score"]["sd"] == pytest.approx(0.1060660)
    lines = "\n".join(_table_seeds(table, {"baseline": ["--schedule", "baseline"]}, out))
    assert "| baseline | `--schedule baseline` | 3 | 2,1,1/1,2 | 0.633 ± 0.153 | 0.833 ± 0.153 |" in lines
    assert "| 0.733 ± 0.153 | 0.783 ± 0.153 | 13.3 ± 2.9 |" in lines
    assert "| split1 | `` | 2 of 3 | 1,1/1 |" in lines and "| 0.475 ± 0.106 |" in lines
    assert "- `split1` seed 3: rc 2; see `split1/seed-3/train.log`" in lines
    write_results(out, table, [1, 2, 3])
    doc = json.loads((out / "report.json").read_text())
    assert doc["seeds"] == [1, 2, 3] and [c["n"] for c in doc["configs"]] == [3, 2]
    assert doc["configs"][0]["stats"]["mean_score"]["sd"] == pytest.approx(0.1527525)
    assert doc["configs"][0]["runs"][0]["dir"] == "baseline/seed-1" and "rows" not in doc["configs"][0]["runs"][0]
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["config"], r["seed"], r["rc"]) for r in rows] == [
        ("baseline", "1", "0"), ("baseline", "2", "0"), ("baseline", "3", "0"),
        ("split1", "1", "0"), ("split1", "2", "0"), ("split1", "3", "2")]
    assert float(rows[0]["mean_score"]) == pytest.approx(0.6) and rows[5]["mean_score"] == ""


def test_one_seed_keeps_the_run_directories_and_train_arguments(tmp_path):
    from smarter_fast.ablate import build_parser, plan_runs
    base = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    one = plan_runs(build_parser().parse_args(base), ["baseline"], tmp_path / "o")
    assert [(r["dir"], r["seed"]) for r in one] == [(tmp_path / "o" / "baseline", 11711)]
    assert "--seed" not in one[0]["argv"]  # as before --seeds: an earlier run is still skipped
    three = plan_runs(build_parser().parse_args(base + ["--seeds", "3"]), ["baseline"], tmp_path / "o")
    assert [r["dir"].name for r in three] == ["seed-11711", "seed-11712", "seed-11713"]
    assert [r["argv"][r["argv"].index("--seed") + 1] for r in three] == ["11711", "11712", "11713"]
    given = plan_runs(build_parser().parse_args(base + ["--seeds", "2", "--seed", "5"]), ["baseline"], tmp_path / "o")
    assert [r["seed"] for r in given] == [5, 6]


def test_seeds_rejects_a_seed_in_train_args_and_a_zero_count(tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--only", "baseline"]
    assert main(argv + ["--seeds", "2", "--train-args", "--seed 3"]) == 2
    assert "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--seeds", "0"])


def test_ablate_two_seeds_end_to_end_with_per_seed_restart(tiny, tmp_path, capsys):
    import csv
    import json
    import statistics
    out = tmp_path / "abl"
    argv = _argv(tiny, out, "--dev-limit", "8", "--seeds", "2", "--seed", "7")
    assert main(argv) == 0
    for seed in (7, 8):
        run = out / "baseline" / f"seed-{seed}"
        done = json.loads((run / "ablate_done.json").read_text())
        assert done["argv"][done["argv"].index("--seed") + 1] == str(seed)
        assert (run / "metrics.jsonl").is_file() and (run / "predictions" / "sst-dev-output.csv").is_file()
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["config"], r["seed"], r["rc"]) for r in rows] == [("baseline", "7", "0"), ("baseline", "8", "0")]
    report = (out / "report.md").read_text()
    assert "trained with 2 seeds (7, 8" in report
    row = next(line for line in report.splitlines() if line.startswith("| baseline |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "2"  # n
    mean = statistics.fmean(float(r["mean_score"]) for r in rows)
    sd = statistics.stdev(float(r["mean_score"]) for r in rows)
    assert cells[7] == f"{mean:.3f} ± {sd:.3f}", cells  # the mean column: both seeds, sample sd
    assert "## SST error analysis (best configuration: baseline" in report
    capsys.readouterr()
    # started again: each seed is skipped on its own; an unfinished one is trained again
    (out / "baseline" / "seed-8" / "ablate_done.json").unlink()
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "[baseline seed 7] done already, skipped" in said and said.count("done already") == 1
    assert (out / "baseline" / "seed-8" / "ablate_done.json").is_file()
