"""Data parallel: `torchrun --nproc_per_node=2 -m smarter_fast.train` (gloo, CPU) matches a
one-process run with the same global batch; only rank 0 writes; sharding helpers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smarter_fast.training.distributed import CallModule, shard
from smarter_fast.train import main

REPO = Path(__file__).resolve().parents[2]
SIZES = {"sst": {"train": 30, "dev": 12, "test-student": 4},
         "quora": {"train": 30, "dev": 12, "test-student": 4},
         "sts": {"train": 22, "dev": 12, "test-student": 4}}


def test_shard_splits_every_global_batch_and_weights_sum_to_world():
    for n in range(1, 12):
        for w in (1, 2, 3, 4):
            parts = [shard(list(range(100, 100 + n)), r, w) for r in range(w)]
            real = [p for p, weight in parts if weight > 0]
            assert sorted(i for p in real for i in p) == list(range(100, 100 + n))
            assert sum(weight for _, weight in parts) == pytest.approx(w)
            assert all(len(p) >= 1 for p, _ in parts)  # every rank runs forward/backward


def test_call_module_runs_any_forward():
    lin = torch.nn.Linear(2, 1)
    m = CallModule(lin)
    assert torch.equal(m(lambda inner, x: inner(x) * 2, torch.ones(2)), lin(torch.ones(2)) * 2)


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_ddp", hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # deterministic


def common(tiny, out, batch):
    ckpt, data = tiny
    return ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "1",
            "--batch-size", str(batch), "--eval-batch-size", "16", "--lr", "1e-3", "--max-length", "48",
            "--num-threads", "1", "--schedule", "split1", "--split-parts", "2", "--smart", "simple"]


def test_torchrun_two_processes_match_one_process(tiny, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(common(tiny, one, 8)) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "smarter_fast.train", *common(tiny, two, 4), "--save-every", "5"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-12000:]  # both ranks: a gloo abort names itself early
    assert p.stdout.count("data: CS224N data in") == 1  # rank 1 is silent
    a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 1
    for ra, rb in zip(a, b):
        assert ra["steps"] == rb["steps"] and ra["train_examples"] == rb["train_examples"]
        # SMART noise is drawn per rank's shard (same law, other draws): close, not bitwise equal
        for k in ("train_loss_sst", "train_loss_quora", "train_loss_sts", "smart_term"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-4), k
        for k in ("sst_acc", "quora_acc", "sts_pearson"):
            assert rb[k] == pytest.approx(ra[k], abs=0.1), k
    state = json.loads((two / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    blob = torch.load(two / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert len(blob["ranks"]) == 2 and all("rng" in r for r in blob["ranks"])
    assert not list(two.glob("**/*rank*")) and not list((two / "checkpoints").glob(".*"))
    assert (two / "predictions" / "sst-dev-output.csv").is_file()


def _torchrun(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "smarter_fast.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_torchrun_symmetric_pairs_train_the_same_orders_as_one_process(tiny, tmp_path, capsys):
    """The pair orders are drawn for the global batch and sliced per rank (they were drawn per
    shard: the weights of two ranks differed from one process by 1e-3)."""
    from safetensors.torch import load_file
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--smart", "off", "--pair-order", "symmetric", "--seed", "3"]
    assert main(common(tiny, one, 8) + flags) == 0
    capsys.readouterr()
    p = _torchrun(common(tiny, two, 4) + flags)
    assert p.returncode == 0, p.stderr[-12000:]  # both ranks: a gloo abort names itself early
    a = load_file(one / "checkpoints" / "last" / "model.safetensors")
    b = load_file(two / "checkpoints" / "last" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_time_budget_stops_every_rank_together(tiny, tmp_path):
    """Each rank's own clock used to decide alone (and ranks other than 0 forgot the time spent in
    earlier epochs): one rank left the loop while the other waited in a collective, and gloo
    aborted the run."""
    out = tmp_path / "budget"
    p = _torchrun(common(tiny, out, 4) + ["--smart", "off", "--epochs", "40", "--time-budget", "0.01",
                                         "--lr-schedule", "linear"])
    assert p.returncode == 0, p.stderr[-12000:]  # both ranks: a gloo abort names itself early
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < 40 and rows[-1]["budget_exhausted"]
