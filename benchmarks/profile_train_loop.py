"""Where the training loop's time goes, step by step (the loop of bench_train_loop.py).

    python benchmarks/profile_train_loop.py [--rounds 3] [--bf16]

Runs `Trainer.train_epoch` on the benchmark's epoch (the report's recipe, 24 batches of 8) with a
timer around each part of a step, and prints each part's share of the loop: batch assembly (from
the encoded examples to padded tensors), forward + backward (the objective), the non-finite check,
the optimizer step, zero_grad, and the rest of the loop (progress, sums, checkpoint cadence, time
budget, Python). A timing aid, not a benchmark: speed claims come from bench_train_loop.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(owner, name, bucket, totals):
    real = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            totals[bucket] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args(argv)
    import bench_train_loop as b
    from smarter_fast.evaluation import EncodedTask
    from smarter_fast.training import components, steps

    train, schedule, real = b.load_loop_data()
    trainer = b._trainer(train, schedule, bf16=a.bf16)
    b.run_epoch(trainer)  # warm-up
    totals = defaultdict(float)
    timed(EncodedTask, "batch", "batch assembly", totals)
    timed(steps, "to_device", "batch assembly", totals)
    timed(steps.BatchSteps, "train_batch", "forward + backward", totals)
    timed(components.NonFiniteGuard, "bad", "non-finite check", totals)
    timed(type(trainer.optimizer), "step", "optimizer step", totals)
    timed(type(trainer.optimizer), "zero_grad", "zero_grad", totals)
    t0 = time.perf_counter()
    for _ in range(a.rounds):
        b.run_epoch(trainer)
    total = time.perf_counter() - t0
    totals["rest of the loop"] = total - sum(totals.values())
    n = a.rounds * sum(len(ix) for _, ix in schedule.epoch_steps(0))
    print(f"{a.rounds} epochs of {len(schedule.epoch_steps(0))} steps, {'bf16' if a.bf16 else 'fp32'}, "
          f"{'cs224n' if real else 'generated'} data: {total:.2f} s, {n / total:.1f} examples/s")
    for name, sec in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {1e3 * sec / (a.rounds * len(schedule.epoch_steps(0))):8.2f} ms/step  {100 * sec / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
