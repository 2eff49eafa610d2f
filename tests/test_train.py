"""`python -m smarter_fast.train` end to end on tiny data with a tiny random BERT checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smarter_fast.train import main

TINY_SIZES = {
    "sst": {"train": 24, "dev": 10, "test-student": 6},
    "quora": {"train": 50, "dev": 10, "test-student": 6},
    "sts": {"train": 16, "dev": 10, "test-student": 6},
}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    """(checkpoint dir, data dir): a 2-layer hidden-32 BERT over a character vocabulary."""
    return make_tiny_run(TINY_SIZES)


def run(tiny, out, *extra):
    ckpt, data = tiny
    return main(["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out),
                 "--batch-size", "4", "--eval-batch-size", "16", "--lr", "1e-3", "--max-length", "64",
                 "--num-threads", "1", *extra])


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_outputs(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny, out, "--epochs", "2", "--split-parts", "2", "--limit", "40") == 0
    stdout = capsys.readouterr().out
    first = stdout.splitlines()[0]
    assert first.startswith("data: CS224N data in") and "checkpoint:" in first
    assert "epoch 2/2" in stdout
    r = rows(out)
    assert [x["epoch"] for x in r] == [1, 2]
    for x in r:
        for key in ("sst_acc", "quora_acc", "sts_pearson", "mean_score", "cs224n_score",
                    "train_seconds", "train_examples", "examples_per_second",
                    "train_loss_sst", "train_loss_quora", "train_loss_sts", "smart_term"):
            assert key in x, key
        assert x["mean_score"] == pytest.approx((x["sst_acc"] + x["quora_acc"] + x["sts_pearson"]) / 3)
        assert x["cs224n_score"] == pytest.approx((x["sst_acc"] + x["quora_acc"] + (x["sts_pearson"] + 1) / 2) / 3)
        # --limit 40 keeps 24 SST, 40 Quora (2 parts of 20), 16 STS
        assert (x["train_examples_sst"], x["train_examples_quora"], x["train_examples_sts"]) == (24, 20, 16)
        assert x["train_examples"] == 60
        assert x["examples_per_second"] == pytest.approx(60 / x["train_seconds"])
    for name in ("best", "last"):
        d = out / "checkpoints" / name
        for f in ("model.safetensors", "config.json", "vocab.txt", "train_state.pt", "trainer_state.json"):
            assert (d / f).is_file(), d / f
    assert json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["epochs_done"] == 2
    preds = out / "predictions"
    for f in ("sst-dev-output.csv", "sst-test-output.csv", "para-dev-output.csv", "para-test-output.csv",
              "sts-dev-output.csv", "sts-test-output.csv"):
        assert (preds / f).is_file(), f
    assert len((preds / "sst-dev-output.csv").read_text().splitlines()) == 11
    assert (preds / "para-dev-output.csv").read_text().startswith("id \t Predicted_Is_Paraphrase")
    for f in ("training_loss.png", "dev_metrics.png", "sst_confusion.png"):
        assert (out / "plots" / f).stat().st_size > 1000
    assert not list((out / "checkpoints").glob(".*"))  # no temporary leftovers

    # the evaluate CLI on the best checkpoint reproduces the best epoch's dev metrics
    from smarter_fast.evaluate import main as evaluate_main
    ev = tmp_path / "ev"
    assert evaluate_main(["--checkpoint", str(out / "checkpoints" / "best"), "--data-dir", str(tiny[1]),
                          "--out", str(ev), "--num-threads", "1"]) == 0
    best = max(r, key=lambda x: x["mean_score"])
    got = json.loads((ev / "dev_metrics.json").read_text())
    assert got["mean_score"] == pytest.approx(best["mean_score"], abs=1e-3)  # other batching: fp noise
    assert got["sst_acc"] == best["sst_acc"]
    assert (ev / "predictions" / "sts-test-output.csv").is_file()


def test_resume_matches_uninterrupted_run_and_is_deterministic(tiny, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--split-parts", "2", "--schedule", "split2", "--smart", "simple", "--interleave")
    assert run(tiny, full, "--epochs", "2", *args) == 0
    assert run(tiny, part, "--epochs", "1", *args) == 0
    assert run(tiny, part, "--epochs", "2", "--resume", *args) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    a, b = rows(full), rows(part)
    assert len(b) == 2
    for key in ("sst_acc", "quora_acc", "sts_pearson", "train_loss_sst", "train_loss_sts", "smart_term"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-5, abs=1e-6), key
    assert a[0]["smart_term"] > 0
    # split2: both Quora and STS cut in two
    assert a[0]["train_examples_quora"] == 25 and a[0]["train_examples_sts"] == 8


def test_resume_without_checkpoint_starts_afresh(tiny, tmp_path, capsys):
    assert run(tiny, tmp_path / "new", "--epochs", "1", "--resume") == 0
    assert "starting afresh" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--smart", "full", "--smart-full-steps", "0"], "--smart-full-steps must be >= 1"),
    (["--layer-decay", "1.5"], "--layer-decay must be"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--split-parts", "x"], "--split-parts must be"),
    (["--dropout", "1.5"], "--dropout must be"),
    (["--schedule", "nope"], "invalid choice"),
    (["--lr", "-1"], "--lr must be"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_is_one_clean_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "smarter_fast.train", "--data-dir", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "not found" in p.stderr
    assert "Traceback" not in p.stderr


def test_time_budget_stops_training_then_evaluates_saves_and_resumes_to_the_end(tiny, tmp_path, capsys):
    out = tmp_path / "budget"
    # 1e-5 min = 0.6 ms: spent by the first step
    assert run(tiny, out, "--time-budget", "1e-05", "--lr-schedule", "linear", "--warmup-ratio", "0.1") == 0
    stdout = capsys.readouterr().out
    assert "recipe report:" in stdout and "time-budget 1e-05" in stdout
    assert "time budget of 1e-05 min spent" in stdout
    (r,) = rows(out)
    assert r["budget_exhausted"] is True and r["epoch"] == 1
    full_epoch = 24 + 25 + 16  # split1, auto parts = round(50 / 24) = 2
    assert r["train_examples"] == 4 < full_epoch  # one step of batch 4
    assert r["train_minutes_total"] >= 1e-5
    assert r["recipe"] == "report" and r["recipe_settings"]["time_budget"] == 1e-5
    assert r["recipe_settings"]["pooling"] == "cls" and r["recipe_settings"]["pair_features"] == "cross"
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (out / "dev_metrics.json").is_file()
    # resuming a run whose budget is spent trains nothing more and still writes its outputs
    assert run(tiny, out, "--time-budget", "1e-05", "--lr-schedule", "linear", "--warmup-ratio", "0.1",
               "--resume") == 0
    assert len(rows(out)) == 1
    assert "best epoch 1" in capsys.readouterr().out


def test_recipe_is_printed_with_overrides_and_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "recipe"
    assert run(tiny, out, "--recipe", "minilm-cpu", "--epochs", "1", "--limit", "12",
               "--precision", "fp32") == 0
    stdout = capsys.readouterr().out
    line = next(x for x in stdout.splitlines() if x.startswith("recipe minilm-cpu:"))
    assert "pooling mean" in line and "set by flags:" in line and "precision auto -> fp32" in line
    (r,) = rows(out)
    assert r["recipe"] == "minilm-cpu"
    assert r["recipe_settings"]["batch_size"] == 4 and r["recipe_settings"]["schedule"] == "sqrt"


@pytest.mark.parametrize("native", [False, True])
def test_recipe_precision_auto_follows_the_cpu(tiny, tmp_path, capsys, monkeypatch, native):
    """minilm-cpu's precision auto runs bf16 only on a CPU with native bf16, says which and why,
    and records the precision it ran (not as an override of the recipe)."""
    import torch

    caps = dict(torch.cpu.get_capabilities(), avx512_bf16=native, amx_bf16=False, cpu_name="TestCPU")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    out = tmp_path / "auto"
    assert run(tiny, out, "--recipe", "minilm-cpu", "--epochs", "1", "--limit", "12") == 0
    stdout = capsys.readouterr().out
    chosen = "bf16" if native else "fp32"
    assert f"precision auto -> {chosen}: this CPU " in stdout
    line = next(x for x in stdout.splitlines() if x.startswith("recipe minilm-cpu:"))
    assert f"precision {chosen}" in line and "precision auto ->" not in line
    assert f"precision {chosen}," in next(x for x in stdout.splitlines() if x.startswith("setup "))
    (r,) = rows(out)
    assert r["recipe_settings"]["precision"] == chosen


def test_ensemble_trains_members_then_averages_their_outputs(tiny, tmp_path, capsys):
    """--ensemble 2: two members (seeds 5 and 6, half the budget each) in OUT/member1..2, then
    OUT/dev_metrics.json and predictions from their averaged outputs, which equal
    evaluation.Ensemble's on the members' best checkpoints and differ from either member's."""
    import numpy as np

    from smarter_fast.data.cs224n import load_cs224n
    from smarter_fast.data.tokenize import load_tokenizer
    from smarter_fast.evaluation import Ensemble, encode_for, model_outputs
    from smarter_fast.model import MultitaskBert

    out = tmp_path / "ens"
    assert run(tiny, out, "--ensemble", "2", "--seed", "5", "--epochs", "1",
               "--pair-order", "symmetric") == 0
    stdout = capsys.readouterr().out
    assert "== ensemble member 1/2: seed 5" in stdout and "== ensemble member 2/2: seed 6" in stdout
    assert "ensemble of 2" in stdout
    members = [MultitaskBert.from_pretrained(out / f"member{i}" / "checkpoints" / "best") for i in (1, 2)]
    summary = json.loads((out / "ensemble.json").read_text())
    assert [m["seed"] for m in summary["members"]] == [5, 6]
    metrics = json.loads((out / "dev_metrics.json").read_text())
    assert summary["mean_score"] == metrics["mean_score"]
    assert (out / "predictions" / "sst-dev-output.csv").is_file()
    assert (out / "predictions" / "sts-test-output.csv").is_file()
    dev = encode_for(members[0], load_cs224n(tiny[1], "dev"), load_tokenizer(str(tiny[0]), max_length=64))
    for task in ("sst", "quora", "sts"):
        each = [model_outputs(m, dev[task]) for m in members]
        assert not np.allclose(each[0], each[1])  # the seeds made different members
        np.testing.assert_allclose(model_outputs(Ensemble(members), dev[task]),
                                   (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        Ensemble([members[0], MultitaskBert.from_pretrained(tiny[0], pair_order="given")])
    # python -m smarter_fast.evaluate with both checkpoints: the same ensemble, the same metrics
    from smarter_fast.evaluate import main as evaluate_main
    assert evaluate_main(["--checkpoint", *(str(out / f"member{i}" / "checkpoints" / "best") for i in (1, 2)),
                          "--data-dir", str(tiny[1]), "--out", str(tmp_path / "ev"), "--num-threads", "1"]) == 0
    again = json.loads((tmp_path / "ev" / "dev_metrics.json").read_text())
    assert again["mean_score"] == pytest.approx(metrics["mean_score"], abs=1e-6)


def test_ensemble_splits_the_time_budget(tiny, tmp_path, capsys):
    out = tmp_path / "ens-budget"
    assert run(tiny, out, "--ensemble", "2", "--time-budget", "2e-05") == 0
    stdout = capsys.readouterr().out
    assert stdout.count("time budget of 1e-05 min spent") == 2
    assert all(rows(out / f"member{i}")[0]["budget_exhausted"] for i in (1, 2))


@pytest.mark.parametrize("flags,warning", [
    (["--schedule", "proportional", "--split-parts", "3"], "--split-parts is ignored by --schedule proportional"),
    (["--schedule", "sqrt", "--interleave"], "--interleave is ignored by --schedule sqrt"),
    (["--schedule", "baseline", "--split-parts", "3"], "--split-parts is ignored by --schedule baseline"),
])
def test_flags_a_schedule_ignores_are_warned_about(flags, warning, caplog):
    from smarter_fast.train import parse_args
    with caplog.at_level("WARNING"):
        parse_args(["--epochs", "1", *flags])
    assert warning in caplog.text


@pytest.mark.parametrize("flags,warning", [
    (["--smart", "full", "--smart-sigma", "0.5"], "--smart-sigma only apply to --smart simple; ignored with --smart full"),
    (["--smart", "simple", "--smart-full-bregman", "--smart-full-steps", "3"],
     "--smart-full-steps, --smart-full-bregman only apply to --smart full; ignored with --smart simple"),
])
def test_flags_of_the_other_smart_mode_are_warned_about(flags, warning, caplog):
    from smarter_fast.train import parse_args
    with caplog.at_level("WARNING"):
        parse_args(["--epochs", "1", *flags])
    assert warning in caplog.text


def test_no_smart_warning_for_the_mode_in_use(caplog):
    from smarter_fast.train import parse_args
    with caplog.at_level("WARNING"):
        parse_args(["--epochs", "1", "--smart", "full", "--smart-full-steps", "2"])
        parse_args(["--epochs", "1", "--smart", "simple", "--smart-sigma", "0.1"])
    assert "only apply to --smart" not in caplog.text


def test_resume_keeps_model_options_that_the_recipe_only_defaulted(tiny, tmp_path, capsys):
    """A run made with --recipe minilm-cpu --pooling cls resumed with --recipe minilm-cpu: the
    recipe's pooling (mean) used to count as an explicit flag and refuse the resume."""
    out = tmp_path / "run"
    assert run(tiny, out, "--recipe", "minilm-cpu", "--pooling", "cls", "--epochs", "1",
               "--precision", "fp32") == 0
    capsys.readouterr()
    assert run(tiny, out, "--recipe", "minilm-cpu", "--epochs", "2", "--precision", "fp32",
               "--resume") == 0
    said = capsys.readouterr().out
    assert "pooling mean gives way to the checkpoint's cls" in said
    assert json.loads((out / "args.json").read_text())["pooling"] == "cls"
    # an explicit flag that contradicts the checkpoint is still refused
    assert run(tiny, out, "--recipe", "minilm-cpu", "--pooling", "mean", "--epochs", "3",
               "--precision", "fp32", "--resume") == 2
