"""The training loop a user runs, next to the benchmarked step and the Hugging Face pipeline.

Group `train-loop-interleaved`: the report's recipe (batch 8, lr 1e-5, tasks one after the other,
length-bucketed batches from pools of 400 examples as `Schedule` draws them) on the first 400
training rows of each task; an "epoch" is the first MIX batches of each task's schedule (24 steps).
Providers, each stepping through that epoch once per round, the order rotating every round:
- `hf`: transformers.BertModel + three Linear heads + torch.optim.AdamW, random batches of the
  same examples (benchutil.hf_bert; as bench_train_pipeline's `hf`);
- `step`, `step-bf16`: the Trainer's `TrainStep` (forward, backward, non-finite check,
  optimizer step) on the epoch's batches padded beforehand, as bench_train_pipeline times it;
- `loop`, `loop-bf16`: `Trainer.train_epoch` on the same epoch: everything the command line
  does per step (batch assembly from the encoded examples, the step, progress, sums, checkpoint
  cadence, time budget), evaluation excluded.
extra_info: each provider's examples/s, loop / step and our providers / hf.
"""

from __future__ import annotations

import time

import pytest

from benchutil import bf16_skip_reason, cs224n_dir, hf_pipeline_step_fn, label, rotation, trainer_step_fn
from smarter_fast.tasks import QUORA, SST, STS

BATCH = 8
LR = 1e-5
ROWS = 400  # one length-bucketing pool per task (Schedule.pool_batches * BATCH)
MIX = {SST.name: 9, QUORA.name: 9, STS.name: 6}  # batches per task of one split1 epoch: 36% / 38% / 26%
ROUNDS = 3
PROVIDERS = ["hf", "step", "loop", "step-bf16", "loop-bf16"]


def _bench_schedule(train_data):
    """The report's schedule over the rows (split1 with one part = all of them), cut to the
    first MIX[task] batches of each task in its order."""
    from smarter_fast.data.schedules import TASK_ORDER, Schedule

    class FirstBatches(Schedule):
        def epoch_steps(self, epoch):
            steps, taken = [], {t: 0 for t in TASK_ORDER}
            for task, ix in super().epoch_steps(epoch):
                if taken[task] < MIX[task]:
                    steps.append((task, ix))
                    taken[task] += 1
            return steps

    return FirstBatches("split1", {t: train_data[t].lengths for t in TASK_ORDER}, BATCH, seed=11711,
                        parts=1, epochs=1)


@pytest.fixture(scope="module")
def loop_data():
    return load_loop_data()


def load_loop_data():
    """(encoded training data, the benchmark's schedule, whether the data is real)."""
    from smarter_fast.data.cs224n import load_cs224n
    from smarter_fast.data.tokenize import load_tokenizer
    from smarter_fast.evaluation import encode_split

    directory, real = cs224n_dir()
    train = encode_split(load_cs224n(directory, "train", limit=ROWS), load_tokenizer(max_length=128))
    return train, _bench_schedule(train), real


def _trainer(train_data, schedule, bf16: bool):
    from smarter_fast.training import TrainConfig, Trainer
    from smarter_fast.training.run import build_model, seed_everything

    config = TrainConfig(lr=LR, precision="bf16" if bf16 else "fp32", pooling="cls", pair_features="cross",
                         pair_order="given", epochs=1)
    seed_everything(0)
    model, optimizer = build_model(config, "cpu")
    return Trainer(config, model, optimizer, schedule, train_data, train_data, "cpu")


def run_epoch(trainer) -> None:
    """One pass of the loop over epoch 0 (from its first step, however often it is called)."""
    from smarter_fast.training.components import TrainingClock
    trainer.progress.position = 0
    trainer.train_epoch(0, TrainingClock(None))


def _epoch_batches(train_data, schedule, shuffled: bool):
    """The epoch's (task, padded batch) items; shuffled: the same examples in random batches."""
    import numpy as np
    items = schedule.epoch_steps(0)
    if not shuffled:
        return [(t, train_data[t].batch(ix)) for t, ix in items]
    out, rng = [], np.random.default_rng(0)
    for task in MIX:
        chosen = rng.permutation([i for t, ix in items if t == task for i in ix])
        out += [(task, train_data[task].batch(chosen[k:k + BATCH].tolist())) for k in range(0, len(chosen), BATCH)]
    return out


def bench_train_loop_interleaved(benchmark, loop_data):
    train_data, schedule, real = loop_data
    no_bf16 = bf16_skip_reason("cpu")
    providers = [p for p in PROVIDERS if not (no_bf16 and p.endswith("bf16"))]
    n_examples = sum(len(ix) for _, ix in schedule.epoch_steps(0))
    runs = {"hf": (lambda step, items: [step(i) for i in items])}
    work = {"hf": (hf_pipeline_step_fn("cpu", LR), _epoch_batches(train_data, schedule, shuffled=True))}
    for p in providers[1:]:
        trainer = _trainer(train_data, schedule, bf16=p.endswith("bf16"))
        if p.startswith("step"):
            step = trainer_step_fn(trainer.model, trainer.optimizer, "cpu", bf16=p.endswith("bf16"))
            work[p] = (step, _epoch_batches(train_data, schedule, shuffled=False))
            runs[p] = lambda step, items: [step(i) for i in items]
        else:
            work[p] = (trainer, None)
            runs[p] = lambda trainer, _: run_epoch(trainer)
    label(benchmark, "train-loop-interleaved", "all", batch_size=BATCH, mix=dict(MIX), rounds=ROUNDS,
          data="cs224n" if real else "generated stand-in", **({"skipped": no_bf16} if no_bf16 else {}))
    seconds = {p: 0.0 for p in providers}
    turn = {"i": 0}

    def round_of_epochs():
        for p in rotation(providers, turn["i"]):
            t0 = time.perf_counter()
            runs[p](*work[p])
            seconds[p] += time.perf_counter() - t0
        turn["i"] += 1

    round_of_epochs()  # warm-up, not counted
    seconds.update({p: 0.0 for p in providers})
    benchmark.pedantic(round_of_epochs, rounds=ROUNDS, iterations=1)
    eps = {p: ROUNDS * n_examples / seconds[p] for p in providers}
    info = benchmark.extra_info
    info.update({f"{p}_examples_per_s": round(eps[p], 2) for p in providers})
    info.update({f"{p}_over_hf": round(eps[p] / eps["hf"], 3) for p in providers[1:]})
    for suffix in ("", "-bf16"):
        if f"loop{suffix}" in eps:
            info[f"loop{suffix}_over_step{suffix}"] = round(eps[f"loop{suffix}"] / eps[f"step{suffix}"], 3)
