"""Training steps over the three tasks in the report pipeline's mix: the issue-5 end-to-end target.

`bench_train_step.py` times SST steps only. The issue-5 target is the training examples/s of the
whole pipeline (SST, Quora and STS, batch 8, split1), whose pair batches are about twice as long.
Group `train-pipeline`: every provider steps through the same N_BATCHES batches of 8 once each,
SST, Quora and STS batches in the proportions of one split1 epoch of the full data (7544 SST,
7999 Quora, 5440 STS examples: 36%, 38%, 26%), task after task as split1 trains them, from the
first rows of each ../shared/data/cs224n training file (a generated stand-in where absent).
- `hf`: transformers.BertModel from the embedded checkpoint + three Linear heads on the pooler
  output (cross-entropy, BCE-with-logits, MSE) + torch.optim.AdamW defaults + random batches;
- `auto`, `auto-bf16`: MultitaskBert + smarter_fast.optim.AdamW on length-bucketed batches (per
  task), as `python -m smarter_fast.train` steps, fp32 and under bf16 autocast.
Batches: as training draws them, from pools of POOL_BATCHES * 8 = 400 examples per task (the
`Schedule` default), sorted by length and cut into batches whose order is shuffled; the first
MIX[task] of those batches are the ones timed. `hf` gets the same 72 examples per task in random
batches, so both sides train on the very same examples and differ only in padding.
extra_info: examples_per_s and ratio_to_hf.

Group `train-pipeline-interleaved` (the figure for the issue-5 targets): the three providers
step in turn, the order rotating every round, through INTERLEAVED_PASSES passes over their 24
batches, so a slower or faster spell of this shared machine hits all of them alike (separate
runs of the group above differed by up to 30% in the `hf` time). extra_info: each provider's
examples/s over all its steps and `auto` / `auto-bf16` over `hf`.
"""

from __future__ import annotations

import time

import pytest

from benchutil import (Cycle, bf16_skip_reason, cs224n_dir, group_name, hf_pipeline_step_fn, label,
                       our_model_and_optimizer, record_step_ratio, rotation, trainer_step_fn)
from smarter_fast.tasks import QUORA, SST, STS, TASKS

BATCH = 8
LR = 1e-5
N_BATCHES = 24
POOL_BATCHES = 50  # smarter_fast.data.schedules.Schedule.pool_batches: training buckets 400 examples at a time
MIX = {SST.name: 9, QUORA.name: 9, STS.name: 6}  # batches per task: 36% / 38% / 26% of 24
PROVIDERS = ["hf", "auto", "auto-bf16"]  # hf first: the others' ratios need it
INTERLEAVED_PASSES = 2


@pytest.fixture(scope="module")
def task_examples():
    """{task: (ids, type_ids, labels)} of the first rows of each training file."""
    from smarter_fast.data import load_tokenizer
    from smarter_fast.data.cs224n import read_task_file
    from smarter_fast.data.tokenize import encode_pairs, encode_sentences

    directory, real = cs224n_dir()
    tok = load_tokenizer()
    out = {}
    n = BATCH * POOL_BATCHES
    for t in TASKS:
        rows, _ = read_task_file(directory / t.file_name("train"), t.name, limit=n)
        if t.is_pair:
            ids, types = encode_pairs(tok, [e.sentence1 for e in rows], [e.sentence2 for e in rows])
        else:
            ids, types = encode_sentences(tok, [e.sentence for e in rows])
        label = int if t.kind == "classification" else float  # class ids; BCE and MSE take floats
        out[t.name] = (ids, types, [label(e.label) for e in rows])
    return out, real


def make_pipeline_batches(examples: dict, bucketed: bool, seed: int = 0) -> list[tuple[str, dict]]:
    """[(task, padded batch)] in split1's task-after-task order, MIX[task] batches per task: the
    first MIX[task] length-bucketed batches of a training pool of the task's examples (bucketed),
    or the same examples in random batches."""
    from smarter_fast.data import LengthBucketSampler, pad_batch, random_batch_sampler

    out = []
    for task, n_batches in MIX.items():
        ids, types, labels = examples[task]
        pool = LengthBucketSampler([len(x) for x in ids], BATCH, pool_batches=POOL_BATCHES, seed=seed)
        batches = pool.batches()[:n_batches]
        if not bucketed:  # the same examples, shuffled into random batches
            chosen = [i for b in batches for i in b]
            batches = [[chosen[j] for j in b] for b in random_batch_sampler(len(chosen), BATCH, seed=seed).batches()]
        for b in batches:
            out.append((task, pad_batch([ids[i] for i in b], [types[i] for i in b],
                                        [labels[i] for i in b])))
    return out


def our_pipeline_step_fn(model, opt, device, bf16: bool):
    """The Trainer's step (benchutil.trainer_step_fn) on (task, batch) items."""
    return trainer_step_fn(model, opt, device, bf16=bf16)


class TaskCycle(Cycle):
    """Cycle over (task, batch) pairs: hands out one pair per round, moved to the device."""

    def __init__(self, items, device):
        self.batches = [(t, {k: v.to(device) for k, v in b.items()}) for t, b in items]
        self.i = 0


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_train_pipeline(benchmark, results, task_examples, provider):
    device = "cpu"  # the issue-5 target is this CPU's; CUDA steps are timed in bench_train_step
    examples, real = task_examples
    if provider.endswith("bf16") and (why := bf16_skip_reason(device)):
        pytest.skip(why)
    bucketed = provider != "hf"
    items = make_pipeline_batches(examples, bucketed)
    group = group_name("train-pipeline", device)
    real_tokens = sum(int(b["attention_mask"].sum()) for _, b in items)
    all_tokens = sum(b["attention_mask"].numel() for _, b in items)
    label(benchmark, group, provider, baseline="hf", batch_size=BATCH,
          batches="length-bucketed" if bucketed else "random", mix=dict(MIX),
          padding=round(1 - real_tokens / all_tokens, 3),
          data="cs224n" if real else "generated stand-in")
    if provider == "hf":
        step = hf_pipeline_step_fn(device, LR)
    else:
        model, opt = our_model_and_optimizer("auto", device, lr=LR)
        step = our_pipeline_step_fn(model, opt, device, bf16=provider.endswith("bf16"))
    benchmark.pedantic(step, setup=TaskCycle(items, device), rounds=N_BATCHES, warmup_rounds=2,
                       iterations=1)
    record_step_ratio(benchmark, results, group, provider, BATCH)


def bench_train_pipeline_interleaved(benchmark, task_examples):
    device = "cpu"
    examples, real = task_examples
    no_bf16 = bf16_skip_reason(device)
    providers = [p for p in PROVIDERS if not (no_bf16 and p.endswith("bf16"))]
    items = {p: make_pipeline_batches(examples, bucketed=p != "hf") for p in providers}
    steps = {"hf": hf_pipeline_step_fn(device, LR)}
    for p in providers[1:]:
        model, opt = our_model_and_optimizer("auto", device, lr=LR)
        steps[p] = our_pipeline_step_fn(model, opt, device, bf16=p.endswith("bf16"))
    cycles = {p: TaskCycle(items[p], device) for p in providers}
    label(benchmark, group_name("train-pipeline-interleaved", device), "all", batch_size=BATCH,
          mix=dict(MIX), passes=INTERLEAVED_PASSES, data="cs224n" if real else "generated stand-in",
          **({"skipped": no_bf16} if no_bf16 else {}))
    seconds = {p: 0.0 for p in providers}
    turn = {"i": 0}

    def round_of_steps():
        order = rotation(providers, turn["i"])
        turn["i"] += 1
        for p in order:
            batch = cycles[p]()[0][0]
            t0 = time.perf_counter()
            steps[p](batch)
            seconds[p] += time.perf_counter() - t0

    for _ in range(2):  # warm-up steps, not counted
        round_of_steps()
    for p in providers:
        seconds[p] = 0.0
    n_steps = INTERLEAVED_PASSES * len(items["hf"])
    benchmark.pedantic(round_of_steps, rounds=n_steps, iterations=1)
    eps = {p: n_steps * BATCH / seconds[p] for p in providers}
    benchmark.extra_info.update({f"{p}_examples_per_s": round(eps[p], 2) for p in providers})
    benchmark.extra_info.update({f"{p}_over_hf": round(eps[p] / eps["hf"], 3) for p in providers[1:]})
