"""Helpers shared by the benchmark modules (`pytest benchmarks/ --benchmark-only`).

Conventions, so that `to_markdown.py` can build one table from the JSON:
- `benchmark.group` names the op and shape (`attention-fwdbwd-L64-D32`, `adamw-minilm`, ...),
  with `-cuda` appended for the CUDA variants;
- `benchmark.name` is the provider (`ref`, `cpp`, `triton`, `sdpa`, `torch-fused`, `hf`, ...);
- `benchmark.extra_info["baseline"]` names the peer of the group that ratios are taken against.

Our backends come from `smarter_fast.ops.OPS[op].ordered()`; a backend that cannot run the inputs
(`not_supported_reasons` non-empty: not built yet, no CUDA, ...) is skipped with its reasons.
Every timed function on CUDA ends with `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "cs224n"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def group_name(base: str, device: str, suffix: str = "") -> str:
    """`attention-fwd-L64-D32` on CPU, `attention-fwd-L64-D32-cuda[-bf16]` on CUDA."""
    name = base if device == "cpu" else f"{base}-{device}"
    return f"{name}-{suffix}" if suffix else name


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device):
    """fn wrapped so that CUDA work finishes inside the timed call."""
    if torch.device(device).type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def our_backends(op_name: str) -> list[str]:
    """Names of our backends of `op_name`, in priority order (for parametrize)."""
    from smarter_fast.ops import OPS

    return [b.name for b in OPS[op_name].ordered()]


def backend_or_skip(op_name: str, name: str, tensors, **options):
    """The Backend record, or pytest.skip with the reasons it cannot run these inputs."""
    from smarter_fast.ops import OPS
    from smarter_fast.ops.registry import triton_interpret

    backend = OPS[op_name].backends[name]
    reasons = backend.not_supported_reasons(tuple(tensors), **options)
    if reasons:
        pytest.skip(f"{op_name} {name}: {'; '.join(reasons)}")
    if name == "triton" and triton_interpret() and all(t.device.type == "cpu" for t in tensors):
        pytest.skip(f"{op_name} triton: TRITON_INTERPRET=1 runs Triton on CPU for correctness, "
                    f"not speed")
    return backend


def rotation(names: list, i: int) -> list:
    """`names` starting at position i (mod len): interleaved benchmarks step their providers in
    this order in round i, so that none always runs first (or always right after another)."""
    k = i % len(names)
    return names[k:] + names[:k]


def bf16_skip_reason(device) -> str | None:
    """Why bf16 autocast is not timed on `device` (no native bf16 matmuls: a CPU without
    AVX512-BF16 or AMX runs them in scalar code, 25-45x slower than fp32), or None."""
    from smarter_fast.precision import native_bf16

    ok, why = native_bf16(torch.device(device))
    return None if ok else f"bf16 not timed: {why}"


def label(benchmark, group: str, provider: str, baseline: str | None = None, **extra) -> None:
    """Sets the group, the provider as the benchmark's name, and extra_info."""
    benchmark.group = group
    benchmark.name = provider
    benchmark.extra_info["provider"] = provider
    if baseline is not None:
        benchmark.extra_info["baseline"] = baseline
    benchmark.extra_info.update(extra)


def mean_seconds(benchmark) -> float | None:
    """Mean of the last run of this fixture (None when benchmarks are skipped or disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    inner = getattr(stats, "stats", stats)
    return getattr(inner, "mean", None)


def time_copy(device: str, n: int, repeats: int = 15) -> float:
    """Copy bandwidth in GB/s: median time of `dst.copy_(src)` on n fp32 elements, 2 * n * 4
    bytes moved per copy."""
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9



def cs224n_dir() -> tuple[Path, bool]:
    """(directory, is_real): ../shared/data/cs224n, or a generated stand-in where it is absent."""
    from smarter_fast.tasks import SST

    if (SHARED_DATA / SST.file_name("train")).is_file():
        return SHARED_DATA, True
    from smarter_fast.data.demo import write_demo_data

    cache = Path(os.environ.get("SMARTER_FAST_CACHE_DIR", Path.home() / ".cache" / "smarter_fast"))
    return write_demo_data(cache / "bench-demo-data"), False



def make_batches(ids, labels, n_batches: int, batch_size: int = 8, bucketed: bool = True,
                 seed: int = 0) -> list[dict]:
    """`n_batches` padded batches over the first n_batches * batch_size examples: length-bucketed
    (one pool, sorted by length, batch order shuffled) or plain random batches. Both kinds cover
    exactly the same examples, so their step times compare the same work."""
    from smarter_fast.data import LengthBucketSampler, pad_batch, random_batch_sampler

    n = n_batches * batch_size
    ids, labels = ids[:n], labels[:n]
    if bucketed:
        sampler = LengthBucketSampler([len(x) for x in ids], batch_size, pool_batches=n_batches,
                                      seed=seed)
    else:
        sampler = random_batch_sampler(n, batch_size, seed=seed)
    return [pad_batch([ids[i] for i in b], None, [labels[i] for i in b]) for b in sampler.batches()]



def padding_share(batches) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return 1.0 - real / total



class Cycle:
    """Hands out the batches in turn (moved to `device`), for benchmark.pedantic's setup."""

    def __init__(self, batches, device):
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self.i = 0

    def __call__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return (b,), {}


# ---- training steps: the Trainer's own step (smarter_fast.training.steps.TrainStep) -------------

def our_model_and_optimizer(backend: str, device, lr: float = 1e-5):
    """MultitaskBert from the embedded MiniLM checkpoint in train mode, with
    smarter_fast.optim.AdamW (flat buffers) on the same backend."""
    from smarter_fast.model import MultitaskBert
    from smarter_fast.optim import AdamW

    torch.manual_seed(0)
    model = MultitaskBert.from_pretrained(backend=backend).to(device).train()
    opt = AdamW(model.parameters(), lr=lr, backend=backend)
    return model, opt


class PackedObjective:
    """The plain SST loss through the packed (variable-length) encoder path."""

    def __call__(self, model, task, batch, global_step):
        from smarter_fast.data import to_packed
        from smarter_fast.tasks import task as task_named, task_loss

        p = to_packed(batch)
        out = model.forward_packed(task_named(task).head, p["input_ids"], p["cu_seqlens"], p["max_seqlen"],
                                   p["token_type_ids"], p["position_ids"])
        loss = task_loss(task, out, batch["labels"])
        return loss, loss, None


def trainer_step_fn(model, opt, device, objective=None, bf16: bool = False):
    """The training loop's step on ready-made (task, batch) items: the objective's forward and
    backward, the non-finite check, optimizer.step(), zero_grad(set_to_none); as the Trainer
    runs it (smarter_fast.training.steps.TrainStep), without a schedule or data loading."""
    from smarter_fast.training.components import NonFiniteGuard
    from smarter_fast.training.objectives import Plain
    from smarter_fast.training.steps import BatchSteps, TrainStep

    shape = BatchSteps(model, objective or Plain(), device, autocast=bf16)
    train_step = TrainStep(model, opt, shape, guard=NonFiniteGuard(), device=device)
    state = {"step": 0}

    def step(item):
        state["step"] += 1
        train_step(item, state["step"])
        sync(device)

    return step


def our_step_fn(model, opt, device, smart: dict | None = None, packed: bool = False,
                bf16: bool = False):
    """One SST training step of our model (trainer_step_fn on batches). smart = {"sigma",
    "lambda", "backend"} adds the simple SMART term, seeded per step; smart = {"mode": "full"}
    trains full SMART with its defaults (`--smart full`); packed runs the packed encoder path;
    bf16 runs the forward under torch.autocast(bfloat16) with fp32 weights and optimizer state
    (`--precision bf16`)."""
    from smarter_fast.tasks import SST
    from smarter_fast.training.objectives import Plain, SmartFull, SmartSimple

    if smart is not None and smart.get("mode") == "full":
        objective = SmartFull(sigma=1e-5, eta=1e-3, steps=1, lam=1.0, epsilon=None, keep_dropout=False,
                              mu=1.0, seed=0)
    elif smart is not None:
        objective = SmartSimple(smart["sigma"], smart["lambda"], 0, backend=smart["backend"])
    else:
        objective = PackedObjective() if packed else Plain()
    step = trainer_step_fn(model, opt, device, objective, bf16)
    return lambda batch: step((SST.name, batch))


def hf_bert(device):
    """transformers.BertModel from the embedded checkpoint, in train mode (seeded; skips the
    benchmark when transformers is absent): the issue's Hugging Face reference encoder."""
    try:
        import transformers
    except ImportError as e:
        pytest.skip(f"transformers is not installed: {e}")
    from smarter_fast.model.checkpoint import default_checkpoint_dir

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    return transformers.BertModel.from_pretrained(str(default_checkpoint_dir())).to(device).train()


def hf_pipeline_step_fn(device, lr: float):
    """The plain Hugging Face pipeline's training step on a (task, batch) item: BertModel from the
    embedded checkpoint, three nn.Linear heads on the pooler output (cross-entropy, BCE with
    logits, MSE), torch.optim.AdamW with its defaults."""
    from smarter_fast.tasks import TASKS, task_loss

    bert = hf_bert(device)
    H = bert.config.hidden_size
    heads = torch.nn.ModuleDict({t.name: torch.nn.Linear(H, t.num_outputs) for t in TASKS}).to(device)
    opt = torch.optim.AdamW(list(bert.parameters()) + list(heads.parameters()), lr=lr)
    single = {t.name for t in TASKS if t.num_outputs == 1}  # (B, 1) -> (B,), as their losses take

    def step(item):
        task, batch = item
        out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch.get("token_type_ids"))
        y = heads[task](out.pooler_output)
        loss = task_loss(task, y.squeeze(-1) if task in single else y, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)

    return step


def record_step_ratio(benchmark, results: dict, group: str, provider: str, batch_size: int) -> None:
    """After a timed training step: examples_per_s and ratio_to_hf (hf measured earlier in the run)."""
    mean = mean_seconds(benchmark)
    if mean:
        results[(group, provider)] = mean
        benchmark.extra_info["examples_per_s"] = round(batch_size / mean, 2)
        hf = results.get((group, "hf"))
        if hf:
            benchmark.extra_info["ratio_to_hf"] = round(hf / mean, 3)
