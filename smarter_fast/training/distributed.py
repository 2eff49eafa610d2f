"""Data-parallel training under `torchrun --nproc_per_node=N -m smarter_fast.train ...`.

- `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process
  group: gloo on CPU, NCCL on CUDA (each rank on cuda:LOCAL_RANK). Without torchrun it is a
  one-process no-op, and every helper below degrades to the identity.
- Sharding: every rank builds the same deterministic Schedule with the *global* batch
  (`--batch-size` x world size), so every rank has the same number of steps per epoch; step
  i's global batch (length-bucketed as a whole) is cut into `world` contiguous chunks and rank r
  trains chunk r. `shard()` also gives the loss weight n_r * world / n so that DDP's gradient
  average equals the one-process gradient of the global batch's mean loss, even when the
  chunks are uneven (a rank with an empty chunk runs one example with weight 0).
- DDP: the model is wrapped in `CallModule` so that any forward (plain, SMART's embeddings +
  encoder path) runs inside DDP's forward: `ddp(fn, *args)` = `fn(model, *args)`. DDP uses
  `gradient_as_bucket_view=False` and copies its reduced buckets into `param.grad` (allocating
  it after `zero_grad(set_to_none=True)`), which the flat-buffer AdamW then gathers into its
  flat grad buffer at `step()` (`sync_grads` semantics); `find_unused_parameters=True` because
  each step uses one task head only (unused heads keep grad None and are skipped, as in one
  process).
- Only rank 0 writes outputs and logs; the others' stdout goes to /dev/null and their
  progress bars are off. Evaluation runs on rank 0 while the others wait at a barrier.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("smarter_fast")


def launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init() -> torch.device | None:
    """Start the process group when launched by torchrun; returns this rank's device (None when
    not distributed). Non-zero ranks are silenced."""
    if not launched():
        return None
    if not active():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"
        log.setLevel(logging.ERROR)
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def shard(indices, r: int | None = None, w: int | None = None) -> tuple[list, float]:
    """(this rank's part of a global batch, loss weight). Parts are contiguous, sizes differ by
    at most one; weight = n_r * w / n (1.0 in one process). An empty part becomes the batch's
    first example with weight 0 (every rank must run forward and backward)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    indices = list(indices)
    if w == 1:
        return indices, 1.0
    part = [int(i) for i in np.array_split(np.asarray(indices, dtype=np.int64), w)[r]]
    if not part:
        return indices[:1], 0.0
    return part, len(part) * w / len(indices)


def all_reduce_max(values: list[float], device="cpu") -> list[float]:
    """Element-wise max over ranks (flags: stop requested, non-finite step)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float], device="cpu") -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_object(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CallModule(torch.nn.Module):
    """forward(fn, *args, **kwargs) = fn(inner, *args, **kwargs): lets DDP see any forward."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, fn, *args, **kwargs):
        return fn(self.inner, *args, **kwargs)


def wrap(model: torch.nn.Module, device):
    """A callable `forward(fn, *args)` = `fn(model, *args)`, through DDP when distributed."""
    if not active():
        return lambda fn, *a, **k: fn(model, *a, **k)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(CallModule(model), device_ids=[device.index] if device.type == "cuda" else None,
              find_unused_parameters=True, gradient_as_bucket_view=False)
    return ddp


def demo_data_dir(out_dir):
    """Where this rank generates the SYNTHETIC demo data: under --out on rank 0, a private
    temporary directory elsewhere (only rank 0 writes into --out)."""
    from pathlib import Path
    if is_main():
        return Path(out_dir) / "demo_data"
    return Path(tempfile.mkdtemp(prefix=f"smarter_fast_rank{rank()}_")) / "demo_data"


__all__ = ["CallModule", "active", "all_gather_object", "all_reduce_max", "all_reduce_sum",
           "barrier", "broadcast_object", "demo_data_dir", "init", "is_main", "launched",
           "rank", "shard", "shutdown", "world", "wrap"]
