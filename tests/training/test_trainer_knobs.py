"""The trainer knobs: gradient accumulation (the larger batch's examples and gradient), gradient
clipping, --max-steps, --eval-every, --encoder-dropout, --device, and the step records of
--report-to (csv and tensorboard), resumed without doubled rows."""

import csv
import json
from copy import deepcopy

import pytest
import torch
from safetensors.torch import load_file

from smarter_fast.train import main

SIZES = {"sst": {"train": 45, "dev": 8, "test-student": 4},
         "quora": {"train": 21, "dev": 8, "test-student": 4},
         "sts": {"train": 19, "dev": 8, "test-student": 4}}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_knobs")


def argv(tiny, out, *extra):
    ckpt, data = tiny
    return ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "1",
            "--eval-batch-size", "8", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1",
            "--split-parts", "1", "--seed", "5", "--precision", "fp32", *extra]


def steps_csv(out):
    with open(out / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(out / "checkpoints" / "last" / "model.safetensors"))


def test_grad_accumulation_equals_the_larger_batch(tiny, tmp_path):
    """--batch-size 8 --grad-accum-steps 2 trains what --batch-size 16 does: the same grad_norm
    at every step (relative 1e-4) and the same weights at the end (1e-5). SST's 45 examples end
    in a batch of 13, run as micro-batches of 8 and 5; Quora's 21 and STS's 19 end unevenly too."""
    common = ("--encoder-dropout", "0", "--report-to", "csv", "--pair-order", "symmetric")
    assert main(argv(tiny, tmp_path / "accum", "--batch-size", "8", "--grad-accum-steps", "2", *common)) == 0
    assert main(argv(tiny, tmp_path / "big", "--batch-size", "16", *common)) == 0
    a, b = steps_csv(tmp_path / "accum"), steps_csv(tmp_path / "big")
    assert len(a) == len(b) == 3 + 2 + 2  # optimizer steps: ceil(45/16) + ceil(21/16) + ceil(19/16)
    for ra, rb in zip(a, b):
        assert ra["task"] == rb["task"]
        assert float(ra["grad_norm"]) == pytest.approx(float(rb["grad_norm"]), rel=1e-4)
        assert float(ra[f"loss_{ra['task']}"]) == pytest.approx(float(rb[f"loss_{rb['task']}"]), rel=1e-4)
    wa, wb = weights(tmp_path / "accum"), weights(tmp_path / "big")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)
    # a different micro-batch split is a different schedule: not equal (the check can fail)
    assert main(argv(tiny, tmp_path / "small", "--batch-size", "8", *common)) == 0
    assert len(steps_csv(tmp_path / "small")) != len(a)


def test_grad_accumulation_under_gradient_surgery(tiny, tmp_path):
    common = ("--encoder-dropout", "0", "--grad-surgery", "pcgrad", "--report-to", "csv")
    assert main(argv(tiny, tmp_path / "accum", "--batch-size", "4", "--grad-accum-steps", "3", *common)) == 0
    assert main(argv(tiny, tmp_path / "big", "--batch-size", "12", *common)) == 0
    a, b = steps_csv(tmp_path / "accum"), steps_csv(tmp_path / "big")
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        assert float(ra["grad_norm"]) == pytest.approx(float(rb["grad_norm"]), rel=1e-4)
    wa, wb = weights(tmp_path / "accum"), weights(tmp_path / "big")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


def test_clipping_scales_the_gradient_to_the_norm():
    """TrainStep clips the global norm before the optimizer reads the gradients (plain SGD, so
    the update is the clipped gradient itself), with torch's clip_grad_norm_ coefficient."""
    from smarter_fast.training.steps import BatchSteps, TrainStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(11, 7), torch.randn(11, 3)

    def objective(m, task, batch, step):
        loss = ((m(batch["x"]) - batch["labels"]) ** 2).mean() * 50
        return loss, loss, None

    def one_step(max_norm):
        copy = deepcopy(model)
        ref = [p.detach().clone() for p in copy.parameters()]
        opt = torch.optim.SGD(copy.parameters(), lr=1.0)
        step = TrainStep(copy, opt, BatchSteps(copy, objective, "cpu"), max_grad_norm=max_norm,
                         need_grad_norm=True)
        step(("sst", {"x": x, "labels": y}), 0)
        return step.grad_norm, [r - p.detach() for r, p in zip(ref, copy.parameters())]

    norm, free = one_step(None)
    clipped_norm, clipped = one_step(0.5)
    assert clipped_norm == pytest.approx(norm) and norm > 0.5
    expected = [g * (0.5 / (norm + 1e-6)) for g in free]
    for got, want in zip(clipped, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert float(total) == pytest.approx(0.5, rel=1e-4)
    _, loose = one_step(1e6)  # a bound above the norm changes nothing
    for got, want in zip(loose, free):
        torch.testing.assert_close(got, want)


def test_clipping_in_a_run_bounds_the_update(tiny, tmp_path):
    """Through the engine (grad sinks, our AdamW): the run with a tiny bound logs the same
    pre-clip norm at its first step but ends with other weights."""
    assert main(argv(tiny, tmp_path / "free", "--batch-size", "16", "--report-to", "csv",
                     "--encoder-dropout", "0")) == 0
    assert main(argv(tiny, tmp_path / "clip", "--batch-size", "16", "--report-to", "csv",
                     "--encoder-dropout", "0", "--max-grad-norm", "1e-3")) == 0
    a, b = steps_csv(tmp_path / "free"), steps_csv(tmp_path / "clip")
    assert float(a[0]["grad_norm"]) == pytest.approx(float(b[0]["grad_norm"]), rel=1e-5)
    assert float(a[0]["grad_norm"]) > 1e-3
    wa, wb = weights(tmp_path / "free"), weights(tmp_path / "clip")
    assert any(not torch.allclose(wa[k], wb[k]) for k in wa)


def test_max_steps_ends_training_and_the_lr_schedule(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--batch-size", "4", "--epochs", "5", "--max-steps", "7",
                     "--lr-schedule", "linear", "--report-to", "csv")) == 0
    steps = steps_csv(out)
    assert [int(r["step"]) for r in steps] == list(range(1, 8))
    lrs = [float(r["lr"]) for r in steps]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 / 7)  # the schedule spans the 7 steps, not 5 epochs
    r = rows(out)
    assert len(r) == 1 and r[0]["global_step"] == 7
    assert r[0]["lr"] == pytest.approx(lrs[-1])  # the rate applied at the epoch's last step
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 7
    # resumed after the limit: nothing more is trained
    assert main(argv(tiny, out, "--batch-size", "4", "--epochs", "5", "--max-steps", "7",
                     "--lr-schedule", "linear", "--report-to", "csv", "--resume")) == 0
    assert len(rows(out)) == 1 and len(steps_csv(out)) == 7


def test_max_steps_alone_needs_no_epochs(tiny, tmp_path):
    ckpt, data = tiny
    out = tmp_path / "run"
    assert main(["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--max-steps", "30",
                 "--batch-size", "8", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1",
                 "--split-parts", "1"]) == 0
    r = rows(out)
    assert r[-1]["global_step"] == 30 and len(r) == 3  # 11 steps per epoch: 11 + 11 + 8


def test_eval_every_adds_rows_with_steps_and_keeps_the_best(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--batch-size", "4", "--epochs", "2", "--eval-every", "5",
                     "--report-to", "csv")) == 0
    r = rows(out)
    per_epoch = 12 + 6 + 5
    assert [x["step"] for x in r] == [5, 10, 15, 20, 23, 25, 30, 35, 40, 45, 46]
    assert [x["epoch_end"] for x in r] == [False] * 4 + [True] + [False] * 5 + [True]
    assert [x["epoch"] for x in r] == [1] * 5 + [2] * 6
    assert r[4]["global_step"] == per_epoch
    best = max(r, key=lambda x: x["mean_score"])
    state = json.loads((out / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["global_step"] == best["step"]  # the best checkpoint is that evaluation's weights
    with open(out / "evals.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    assert [int(e["step"]) for e in evals] == [x["step"] for x in r]
    # the time budget on resume counts epoch rows only
    from smarter_fast.training.components import RunRecord
    record = RunRecord()
    record.rows = r
    assert record.train_seconds() == pytest.approx(sum(x["train_seconds"] for x in r if x["epoch_end"]))


def test_without_eval_every_rows_stay_one_per_epoch(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--batch-size", "8", "--epochs", "2")) == 0
    r = rows(out)
    assert [x["epoch"] for x in r] == [1, 2] and all("step" not in x for x in r)
    assert not (out / "steps.csv").exists()


def test_stop_and_resume_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    """Stopped mid-epoch (as on SIGTERM: `last` saved after step 9), with a step row left after
    the checkpoint (as a crash would leave), then resumed: the step records are cut back, not
    doubled, and records, metrics rows and weights equal an uninterrupted run's, with the knobs
    on (accumulation, clipping, --eval-every)."""
    import signal

    from smarter_fast.training.trainer import Trainer
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ("--batch-size", "2", "--grad-accum-steps", "2", "--epochs", "2", "--report-to", "csv,tensorboard",
             "--max-grad-norm", "0.5", "--eval-every", "4")
    assert main(argv(tiny, full, *extra)) == 0
    real = Trainer._after_step

    def after_step(self, position, n_steps):
        if self.progress.global_step == 9:
            self.stop.signum, self.step.stop_now = signal.SIGTERM, True
        return real(self, position, n_steps)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_after_step", after_step)
        assert main(argv(tiny, cut, *extra)) == 128 + signal.SIGTERM
    with open(cut / "steps.csv", "a") as f:  # a record written after the checkpoint, before a crash
        f.write("10,0.5,sst,9,,,,0.001,1,100,0\n")
    assert main(argv(tiny, cut, *extra, "--resume")) == 0
    a, b = steps_csv(full), steps_csv(cut)
    assert [int(x["step"]) for x in b] == list(range(1, len(a) + 1))
    for ra, rb in zip(a, b):
        assert ra["task"] == rb["task"]
        assert float(ra["grad_norm"]) == pytest.approx(float(rb["grad_norm"]), rel=1e-5)
    timing = ("seconds", "per_second", "minutes")
    strip = [[{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows(x)] for x in (full, cut)]
    assert strip[0] == strip[1] and len(strip[0]) > 2
    wa, wb = weights(full), weights(cut)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_tensorboard_events_read_back(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra; not installed here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--batch-size", "8", "--report-to", "tensorboard", "--eval-every", "4")) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/lr", "train/grad_norm", "train/examples_per_second", "train/loss_sst",
            "dev/mean_score", "dev/sst_acc"} <= tags
    assert [e.step for e in acc.Scalars("train/grad_norm")] == list(range(1, 13))  # 6 + 3 + 3 steps
    assert [e.step for e in acc.Scalars("dev/mean_score")] == [4, 8, 12]
    assert not (out / "steps.csv").exists()


def test_step_records_under_layer_decay_name_every_group(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(argv(tiny, out, "--batch-size", "8", "--report-to", "csv", "--layer-decay", "0.5",
                     "--lr-schedule", "linear")) == 0
    first = steps_csv(out)[0]
    names = ["lr_embeddings", "lr_layer0", "lr_layer1", "lr_heads"]
    assert all(n in first for n in names)
    lrs = [float(first[n]) for n in names]
    assert lrs == pytest.approx([1e-3 * 0.125, 1e-3 * 0.25, 1e-3 * 0.5, 1e-3])
    assert float(first["lr"]) == pytest.approx(lrs[-1])


def test_encoder_dropout_sets_every_encoder_dropout(tiny):
    from smarter_fast.model import MultitaskBert
    model = MultitaskBert.from_pretrained(tiny[0])
    model.bert.set_dropout(0.0)
    model.train()
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    a = model.bert(ids, attention_mask=mask)
    b = model.bert(ids, attention_mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # train mode, yet no randomness left
    model.bert.set_dropout(0.3)
    assert model.bert.config.attention_probs_dropout_prob == model.bert.config.hidden_dropout_prob == 0.3
    assert all(layer.attn_dropout == 0.3 and layer.dropout.p == 0.3 for layer in model.bert.layers)
    assert model.bert.embeddings.dropout.p == 0.3


def test_device_and_report_to_are_checked(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(argv(tiny, tmp_path / "a", "--report-to", "csv,wandb"))
    assert "--report-to: unknown 'wandb'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argv(tiny, tmp_path / "b", "--device", "cuda")) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
