"""Crash-safe checkpoints: SIGKILL at a random moment + --resume gives exactly the metrics of an
uninterrupted run; SIGTERM saves mid-epoch and exits cleanly; NaN/inf steps are skipped and K in a
row stop the run with the last good checkpoint kept."""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smarter_fast.training.checkpoint import find_last_checkpoint, read_state
from smarter_fast.train import main

SIZES = {"sst": {"train": 48, "dev": 8, "test-student": 4},
         "quora": {"train": 48, "dev": 8, "test-student": 4},
         "sts": {"train": 32, "dev": 8, "test-student": 4}}
TIMING = {"train_seconds", "examples_per_second", "eval_seconds", "train_minutes_total"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_resume")


def argv(tiny, out, *extra):
    ckpt, data = tiny
    return ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--eval-batch-size", "16", "--lr", "1e-3", "--max-length", "48",
            "--num-threads", "1", "--dropout", "0.1", "--smart", "simple", "--interleave",
            "--schedule", "split1", "--split-parts", "2", *extra]


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def comparable(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(out)]


def spawn(args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "smarter_fast.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_mid_epoch_checkpoint(out, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        last = find_last_checkpoint(out)
        if last is not None:
            try:
                if read_state(last)["global_step"] >= 2:
                    return
            except (OSError, ValueError, KeyError):
                pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(argv(tiny, out)) == 0
    return comparable(out)


def test_sigkill_at_random_moments_then_resume_matches(tiny, reference, tmp_path):
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(3):  # kill the same run up to three times, at random moments
        proc = spawn(argv(tiny, out, "--save-every", "1", *(["--resume"] if attempt else [])))
        wait_for_mid_epoch_checkpoint(out, proc) if attempt == 0 else time.sleep(0)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
    assert kills >= 1
    assert find_last_checkpoint(out) is not None
    assert main(argv(tiny, out, "--save-every", "1", "--resume")) == 0
    assert comparable(out) == reference  # exactly: weights, optimizer, RNG, partial sums restored


def test_sigterm_saves_mid_epoch_and_exits_cleanly(tiny, reference, tmp_path, capsys):
    out = tmp_path / "term"
    proc = spawn(argv(tiny, out, "--save-every", "2"))
    wait_for_mid_epoch_checkpoint(out, proc)  # training (signal handlers installed)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived (very fast machine)")
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM; checkpoint saved in" in stderr
    state = read_state(find_last_checkpoint(out))
    assert state["epochs_done"] < 2
    assert main(argv(tiny, out, "--resume")) == 0
    assert "resuming" in capsys.readouterr().out
    assert comparable(out) == reference


def test_nonfinite_steps_are_skipped_and_counted(tiny, tmp_path, monkeypatch, capsys):
    from smarter_fast import tasks
    real, calls = tasks.SST.loss, {"n": 0}

    def flaky(out, labels):  # the 2nd and 4th SST steps get a NaN loss
        calls["n"] += 1
        loss = real(out, labels)
        return loss * float("nan") if calls["n"] in (2, 4) else loss

    monkeypatch.setitem(tasks.BY_NAME, "sst", dataclasses.replace(tasks.SST, loss=flaky))
    out = tmp_path / "nan"
    assert main(argv(tiny, out, "--smart", "off", "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert err.count("non-finite loss or gradient") == 2
    r = rows(out)[0]
    assert r["nonfinite_skipped"] == 2 and math.isfinite(r["train_loss_sst"])
    sd = torch.load(find_last_checkpoint(out) / "train_state.pt", weights_only=True)["states"]["optimizer"]
    assert all(torch.isfinite(s["exp_avg"]).all() for s in sd["state"].values())


def test_nonfinite_in_a_row_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    from smarter_fast import tasks
    from smarter_fast.training.trainer import Trainer
    state = {"epoch2": False}
    real_epoch = Trainer.train_epoch

    def epoch_hook(self, epoch, clock):
        state["epoch2"] = epoch >= 1
        return real_epoch(self, epoch, clock)

    def poison(fn):
        return lambda out, labels: fn(out, labels) + (float("inf") if state["epoch2"] else 0.0)

    for t in tasks.TASKS:
        monkeypatch.setitem(tasks.BY_NAME, t.name, dataclasses.replace(t, loss=poison(t.loss)))
    monkeypatch.setattr(Trainer, "train_epoch", epoch_hook)
    out = tmp_path / "inf"
    assert main(argv(tiny, out, "--smart", "off", "--max-nonfinite", "3")) == 2
    err = capsys.readouterr().err
    assert "error: 3 training steps in a row had a NaN or infinite loss or gradient" in err
    assert "last good checkpoint is in" in err
    last = find_last_checkpoint(out)
    assert read_state(last)["epochs_done"] == 1 and read_state(last)["next_step_in_epoch"] == 0
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(last / "model.safetensors").values())
    assert len(rows(out)) == 1


def _stop_at(monkeypatch, global_step: int):
    """As a SIGTERM arriving during global step `global_step`: the run saves and stops after it."""
    from smarter_fast.training.trainer import Trainer
    real = Trainer._after_step

    def after_step(self, position, n_steps):
        if self.progress.global_step == global_step:
            self.stop.signum, self.step.stop_now = signal.SIGTERM, True
        return real(self, position, n_steps)

    monkeypatch.setattr(Trainer, "_after_step", after_step)


@pytest.mark.parametrize("extra", [
    ("--smart", "off", "--grad-surgery", "gradvac"),  # GradVac's targets and pair orders
    ("--smart", "full", "--smart-full-bregman", "--smart-full-steps", "2"),  # the EMA teacher
], ids=["gradvac", "smart-full-bregman"])
def test_stop_mid_epoch_then_resume_matches_uninterrupted(tiny, tmp_path, monkeypatch, extra):
    ref = tmp_path / "ref"
    assert main(argv(tiny, ref, *extra)) == 0
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _stop_at(m, 3)
        assert main(argv(tiny, out, "--save-every", "2", *extra)) == 128 + signal.SIGTERM
    state = read_state(find_last_checkpoint(out))
    assert state["epochs_done"] == 0 and state["global_step"] == 3
    assert main(argv(tiny, out, "--resume", *extra)) == 0
    assert comparable(out) == comparable(ref)


def test_surgery_skips_nonfinite_steps_and_counts_them_in_a_row(tiny, tmp_path, monkeypatch, capsys):
    from smarter_fast import tasks
    real, calls = tasks.SST.loss, {"n": 0}

    def every_other(out, labels):  # every second surgery step gets a NaN SST loss
        calls["n"] += 1
        loss = real(out, labels)
        return loss * float("nan") if calls["n"] % 2 == 0 else loss

    monkeypatch.setitem(tasks.BY_NAME, "sst", dataclasses.replace(tasks.SST, loss=every_other))
    out = tmp_path / "nan"
    # never two in a row: --max-nonfinite 2 must not stop the run
    assert main(argv(tiny, out, "--smart", "off", "--epochs", "1", "--grad-surgery", "pcgrad",
                     "--max-nonfinite", "2")) == 0
    r = rows(out)[0]
    assert r["nonfinite_skipped"] == calls["n"] // 2 > 0
    assert math.isfinite(r["train_loss_sst"])
