"""Padding and training-step throughput on real SST batches of 32, random vs length-bucketed.

    python benchmarks/padding_throughput.py [DATA_DIR]    (default ../shared/data/cs224n)

Our model (embedded MiniLM, backend auto, smarter_fast.optim.AdamW); the two kinds of batch
take turns step by step, so machine load affects both alike.
"""

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smarter_fast.data import load_tokenizer  # noqa: E402
from smarter_fast.data.batching import (LengthBucketSampler, pad_batch,  # noqa: E402
                                        padding_fraction, random_batch_sampler)
from smarter_fast.data.cs224n import read_sst  # noqa: E402
from smarter_fast.model import MultitaskBert  # noqa: E402
from smarter_fast.model.grad_sinks import attach_grad_sinks  # noqa: E402
from smarter_fast.optim import AdamW  # noqa: E402
from smarter_fast.tasks import SST, task_loss  # noqa: E402


def main(data_dir: Path, steps: int = 25, batch_size: int = 32) -> None:
    torch.manual_seed(0)
    examples, _ = read_sst(str(data_dir / SST.file_name("train")))
    encoded = load_tokenizer().encode_batch([e.sentence for e in examples])
    ids = [e.ids for e in encoded]
    labels = [e.label for e in examples]
    samplers = {"random": random_batch_sampler(len(ids), batch_size, seed=0),
                "bucketed": LengthBucketSampler([len(i) for i in ids], batch_size, seed=0)}
    batches = {name: [pad_batch([ids[i] for i in b], labels=[labels[i] for i in b]) for b in s]
               for name, s in samplers.items()}
    for name, bs in batches.items():
        print(f"{name}: padding fraction {padding_fraction(bs):.3f}")

    model = MultitaskBert.from_pretrained().train()
    opt = AdamW(model.parameters(), lr=1e-5)
    attach_grad_sinks(model, opt)  # as the Trainer's step does

    def step(b):
        loss = task_loss(SST.name, model.predict_sentiment(b["input_ids"], b["attention_mask"]),
                         b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()

    for b in batches["random"][:3]:  # warm-up
        step(b)
    seconds = {name: 0.0 for name in batches}
    for i in range(steps):
        for name in batches:  # interleaved
            start = time.perf_counter()
            step(batches[name][i])
            seconds[name] += time.perf_counter() - start
    rate = {name: steps * batch_size / seconds[name] for name in batches}
    for name in batches:
        print(f"{name}: {rate[name]:.1f} sentences/s over {steps * batch_size} sentences")
    print(f"bucketed / random: {rate['bucketed'] / rate['random']:.2f}x")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "cs224n")
