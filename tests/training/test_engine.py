"""The training engine's fixes and contracts: per-task pair orders in gradient-surgery steps,
skipped steps counted alike in every step shape, no disk access in a step, dev evaluation sharded
over ranks with the same outputs, generic component checkpoints, old checkpoints refused."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from smarter_fast.train import main

SIZES = {"sst": {"train": 24, "dev": 8, "test-student": 4},
         "quora": {"train": 24, "dev": 8, "test-student": 4},
         "sts": {"train": 24, "dev": 8, "test-student": 4}}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_engine")


def argv(tiny, out, *extra):
    ckpt, data = tiny
    return ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--eval-batch-size", "8", "--lr", "1e-3", "--max-length", "48",
            "--num-threads", "1", "--split-parts", "1", "--seed", "5", *extra]


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def record_swaps(monkeypatch):
    """Every training batch's (task, swap pattern), in call order (evaluation calls pass a bool)."""
    from smarter_fast.evaluation import EncodedTask
    seen, real = [], EncodedTask.batch

    def batch(self, indices, pad_id=0, swap=None):
        if isinstance(swap, np.ndarray):
            seen.append((self.task, swap.copy()))
        return real(self, indices, pad_id, swap)

    monkeypatch.setattr(EncodedTask, "batch", batch)
    return seen


def test_group_steps_draw_an_independent_pair_order_per_task(tiny, tmp_path, monkeypatch):
    """A gradient-surgery step used to give its Quora and STS batches the same swap pattern
    (keyed by seed and step only)."""
    seen = record_swaps(monkeypatch)
    assert main(argv(tiny, tmp_path / "run", "--grad-surgery", "pcgrad", "--pair-order", "symmetric")) == 0
    groups = list(zip(seen[0::2], seen[1::2]))  # each step: quora, then sts
    assert groups and all(q[0] == "quora" and s[0] == "sts" for q, s in groups)
    same = [np.array_equal(q[1], s[1]) for q, s in groups if len(q[1]) == len(s[1])]
    assert same and not all(same)


def test_single_task_steps_keep_their_pair_order(tiny, tmp_path, monkeypatch):
    """Runs without gradient surgery draw what they drew before: rng([seed, 7211, step])."""
    seen = record_swaps(monkeypatch)
    assert main(argv(tiny, tmp_path / "run", "--pair-order", "symmetric", "--interleave")) == 0
    ckpt_rows = rows(tmp_path / "run")
    assert ckpt_rows[0]["steps"] == 18
    steps = [(i, s) for i, s in enumerate(seen)]  # interleaved: one batch per step; SST has none
    from smarter_fast.training.trainer import Trainer  # noqa: F401  (the engine under test)
    sst_steps = {0, 3, 6, 9, 12, 15}  # sst, quora, sts, sst, ... (6 batches each)
    pair_steps = [g for g in range(18) if g not in sst_steps]
    assert len(steps) == len(pair_steps)
    for g, (_, (task, swap)) in zip(pair_steps, steps):
        expect = np.random.default_rng([5, 7_211, g]).random(len(swap)) < 0.5
        np.testing.assert_array_equal(swap, expect)


@pytest.mark.parametrize("shape", [[], ["--grad-surgery", "pcgrad"]], ids=["single-task", "surgery"])
def test_skipped_steps_count_alike_in_every_step_shape(tiny, tmp_path, monkeypatch, shape):
    """The single-task loop counted a skipped step's examples as trained, the surgery loop did not."""
    from smarter_fast import tasks
    real, calls = tasks.SST.loss, {"n": 0}

    def nan_on_second(out, labels):
        calls["n"] += 1
        loss = real(out, labels)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setitem(tasks.BY_NAME, "sst", dataclasses.replace(tasks.SST, loss=nan_on_second))
    out = tmp_path / "run"
    assert main(argv(tiny, out, *shape)) == 0
    r = rows(out)[0]
    assert r["nonfinite_skipped"] == 1
    trained = sum(r[f"train_examples_{t}"] for t in ("sst", "quora", "sts"))
    assert r["train_examples"] == trained < 72
    assert math.isfinite(r["train_loss_sst"])


def test_a_training_step_touches_no_file(tiny, tmp_path, monkeypatch):
    """The non-finite check looked for checkpoints on disk at every step to word a hint."""
    from smarter_fast.training import steps
    inside, stats = {"on": False}, []
    real_call, real_stat = steps.TrainStep.__call__, os.stat

    def call(self, *a, **k):
        inside["on"] = True
        try:
            return real_call(self, *a, **k)
        finally:
            inside["on"] = False

    def stat(path, *a, **k):
        if inside["on"]:
            stats.append(str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(steps.TrainStep, "__call__", call)
    monkeypatch.setattr(os, "stat", stat)
    assert main(argv(tiny, tmp_path / "run", "--save-every", "2")) == 0
    assert stats == []


def test_sharded_dev_evaluation_gives_the_one_process_outputs(tiny, monkeypatch):
    """Under torchrun every rank evaluates every world-th batch (rank 0 alone did, while the
    others waited in a collective); gathered, the outputs are those of one process."""
    from smarter_fast.training import distributed
    from smarter_fast.data.tokenize import load_tokenizer
    from smarter_fast.evaluation import EncodedTask, model_outputs
    from smarter_fast.model import MultitaskBert
    ckpt, _ = tiny
    model = MultitaskBert.from_pretrained(ckpt, backend="ref")
    tok = load_tokenizer(ckpt, max_length=48)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "a", "plot", "dull", "witty", "long"]
    from smarter_fast.data.cs224n import PairExample
    data = EncodedTask("sts", [PairExample(str(i), " ".join(rng.choice(words, rng.integers(2, 9))),
                                           " ".join(rng.choice(words, 4)), float(rng.uniform(0, 5)))
                               for i in range(23)], tok, "cross")
    whole = model_outputs(model, data, batch_size=5)

    class Gathered(Exception):
        pass

    def rank1_gather(mine):  # rank 1's share, taken as the collective is entered
        raise Gathered(mine)

    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_gather_object", rank1_gather)
    with pytest.raises(Gathered) as e:
        model_outputs(model, data, batch_size=5, shard=distributed)
    part1 = e.value.args[0]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: [mine, part1])
    got = model_outputs(model, data, batch_size=5, shard=distributed)
    np.testing.assert_array_equal(got, whole)
    assert 0 < len(part1) < 23  # rank 1 did its share: batches 1, 3 of 5


class Counter:
    def __init__(self):
        self.n, self.t = 0, torch.zeros(3)

    def state_dict(self):
        return {"n": self.n, "t": self.t}

    def load_state_dict(self, sd):
        self.n, self.t = sd["n"], sd["t"].clone()


def test_the_checkpointer_saves_any_registered_component(tiny, tmp_path):
    from smarter_fast.model import MultitaskBert
    from smarter_fast.training.checkpoint import Checkpointer, find_last_checkpoint
    model = MultitaskBert.from_pretrained(tiny[0], backend="ref")
    a, r = Counter(), Counter()
    a.n, a.t = 7, torch.arange(3.0)
    r.n = 2
    Checkpointer(model, {"counter": a}, {"mine": r}).save(tmp_path / "checkpoints" / "last", {"note": 1})
    assert find_last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last"
    b, rb = Counter(), Counter()
    summary = Checkpointer(model, {"counter": b}, {"mine": rb}).load(tmp_path / "checkpoints" / "last")
    assert (b.n, b.t.tolist(), rb.n, summary["note"]) == (7, [0.0, 1.0, 2.0], 2, 1)
    from smarter_fast.training.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="no state for other"):
        Checkpointer(model, {"other": Counter()}).load(tmp_path / "checkpoints" / "last")
    new = Counter()  # a component an option adds may be absent: it starts afresh
    Checkpointer(model, {"counter": Counter(), "new": new}, optional=("new",)).load(tmp_path / "checkpoints" / "last")
    assert new.n == 0


@pytest.mark.parametrize("extra", [(), ("--ema", "0.5")], ids=["copied-best", "ema-best"])
def test_every_checkpoint_holds_its_sentence_transformers_modules(tiny, tmp_path, extra):
    """modules.json and the module folders are written into the temporary directory and so end up
    inside checkpoints/last and checkpoints/best (copied from last, or saved from the --ema
    average), truncating at the run's --max-length; nothing temporary is left."""
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--pooling", "cls", "--backend", "ref", *extra)) == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["best", "last"]
    for name in ("best", "last"):
        d = ck / name
        assert [m["path"] for m in json.loads((d / "modules.json").read_text())] == ["", "1_Pooling", "2_Dense"]
        assert json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"] == 48
        assert (d / "1_Pooling" / "config.json").is_file() and (d / "2_Dense" / "config.json").is_file()
        from safetensors.torch import load_file
        dense, weights = load_file(str(d / "2_Dense" / "model.safetensors")), load_file(str(d / "model.safetensors"))
        assert torch.equal(dense["linear.weight"], weights["bert.pooler.dense.weight"])


def test_copy_checkpoint_copies_module_folders(tmp_path):
    from smarter_fast.training.checkpoint import copy_checkpoint
    src = tmp_path / "last"
    (src / "2_Dense").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "2_Dense" / "config.json").write_text("dense")
    copy_checkpoint(src, tmp_path / "best")
    assert (tmp_path / "best" / "2_Dense" / "config.json").read_text() == "dense"
    assert (tmp_path / "best" / "config.json").read_text() == "{}"


def test_a_checkpoint_of_the_previous_format_is_refused_with_a_reason(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(tiny, out)) == 0
    last = out / "checkpoints" / "last"
    state = json.loads((last / "trainer_state.json").read_text())
    # the files of a format-2 checkpoint: optimizer.pt and the state in JSON, no train_state.pt
    (last / "trainer_state.json").write_text(json.dumps({**state, "version": 2}))
    blob = torch.load(last / "train_state.pt", weights_only=True)
    torch.save(blob["states"]["optimizer"], last / "optimizer.pt")
    (last / "train_state.pt").unlink()
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(argv(tiny, out, "--resume", "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "format version 2" in err and "--pretrained" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing overwritten
    assert (last / "optimizer.pt").is_file()


@pytest.mark.parametrize("poison", ["nan-grad", "inf-grad", "-inf-grad", "nan-loss", "none"])
def test_the_nonfinite_check_sees_any_bad_value(poison):
    from smarter_fast.training.components import NonFiniteGuard
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 3), (5,), (11, 13))]
    for p in params:
        p.grad = torch.randn_like(p)
    loss = torch.tensor(0.5)
    value = {"nan-grad": float("nan"), "inf-grad": float("inf"), "-inf-grad": -float("inf")}.get(poison)
    if value is not None:
        params[2].grad[4, 9] = value
    if poison == "nan-loss":
        loss = torch.tensor(float("nan"))
    guard = NonFiniteGuard()
    assert guard.bad([loss], params) is (poison != "none")
    if poison == "none":
        expect = torch.cat([p.grad.reshape(-1) for p in params]).norm()
        assert guard.grad_norm == pytest.approx(float(expect), rel=1e-6)


def test_resume_with_an_added_option_starts_its_state_afresh_and_other_surgery_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--grad-surgery", "pcgrad")) == 0
    capsys.readouterr()
    assert main(argv(tiny, out, "--grad-surgery", "pcgrad", "--ema", "0.9", "--epochs", "2", "--resume")) == 0
    assert "holds no ema state (the option is new to this run): it starts afresh" in capsys.readouterr().out
    assert main(argv(tiny, out, "--grad-surgery", "gradvac", "--epochs", "3", "--resume")) == 2
    assert "it was trained with --grad-surgery pcgrad" in capsys.readouterr().err  # by its config.toml
    (out / "config.toml").unlink()  # as a run made before config.toml: the component state refuses it
    assert main(argv(tiny, out, "--grad-surgery", "gradvac", "--epochs", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "surgery state" in err and "'pcgrad'" in err
