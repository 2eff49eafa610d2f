"""Length-aware batching: dynamic padding, length-bucketed batch order, and the packed (varlen) form.

Random batches of CS224N sentences are about half padding; sorting by length within pools of
`pool_batches` batches and then shuffling the batches keeps batches random enough for SGD while
padding only to similar lengths. The packed form drops padding altogether: tokens of all sequences
concatenated, with `cu_seqlens` marking where each starts.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized examples: item i is {'input_ids', 'token_type_ids', 'label'} for `collate`."""

    def __init__(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]] | None = None, labels=None):
        if type_ids is not None and len(type_ids) != len(ids):
            raise ValueError(f"{len(ids)} id lists but {len(type_ids)} type id lists")
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"{len(ids)} id lists but {len(labels)} labels")
        self.ids, self.type_ids, self.labels = ids, type_ids, labels
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i]}
        if self.type_ids is not None:
            item["token_type_ids"] = self.type_ids[i]
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


def pad_batch(ids, type_ids=None, labels=None, pad_id: int = 0) -> dict:
    """Pads to the longest sequence in this batch (right padding); int64 tensors, plus labels if given."""
    batch_size, max_len = len(ids), max((len(x) for x in ids), default=0)
    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.int64)
    token_type_ids = torch.zeros((batch_size, max_len), dtype=torch.int64)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.int64)
    for row, seq in enumerate(ids):
        n = len(seq)
        input_ids[row, :n] = torch.as_tensor(seq, dtype=torch.int64)
        attention_mask[row, :n] = 1
        if type_ids is not None:
            token_type_ids[row, :n] = torch.as_tensor(type_ids[row], dtype=torch.int64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if labels is not None:
        batch["labels"] = torch.tensor(labels)  # int labels -> int64, float labels -> float32
    return batch


def collate(items: Sequence[dict], pad_id: int = 0) -> dict:
    """DataLoader collate_fn for EncodedDataset items: dynamic padding to the batch maximum."""
    ids = [it["input_ids"] for it in items]
    type_ids = [it["token_type_ids"] for it in items] if "token_type_ids" in items[0] else None
    labels = [it["label"] for it in items] if "label" in items[0] else None
    return pad_batch(ids, type_ids, labels, pad_id=pad_id)


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batch sampler (lists of indices) with batches of similar lengths.

    Each epoch: shuffle the indices, cut them into pools of `pool_batches * batch_size`, sort each pool
    by length and cut it into batches, then shuffle the batch order. Every index appears exactly once
    per epoch; the order depends only on (seed, epoch) — call `set_epoch(e)` before each epoch.
    pool_batches=1 gives plain random batches (sorting inside one batch changes nothing).
    With shuffle=False the order is fixed: pools in index order, sorted, batches in order.
    """

    def __init__(self, lengths, batch_size: int, pool_batches: int = 50, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.pool_batches = batch_size, pool_batches
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pool_size = self.pool_batches * self.batch_size
        batches = []
        for start in range(0, n, pool_size):
            pool = order[start:start + pool_size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        # Pools are whole multiples of batch_size, so only the very last batch can be short.
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        return iter(self.batches())


def random_batch_sampler(n: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                         drop_last: bool = False) -> LengthBucketSampler:
    """Plain random batches of `n` examples (for comparison with length bucketing)."""
    return LengthBucketSampler(np.zeros(n, dtype=np.int64), batch_size, pool_batches=1,
                               shuffle=shuffle, seed=seed, drop_last=drop_last)


def to_packed(batch: dict) -> dict:
    """Padded batch -> packed form for the varlen path.

    Returns input_ids (T,), token_type_ids (T,), position_ids (T,), cu_seqlens int32 (B+1,) with
    sequence b in [cu_seqlens[b], cu_seqlens[b+1]), max_seqlen (int), and labels when present.
    Needs right padding (attention_mask a run of ones then zeros), as pad_batch makes.
    """
    mask = batch["attention_mask"].bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("to_packed needs right-padded batches (attention_mask ones then zeros)")
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    packed = {
        "input_ids": batch["input_ids"][mask],  # boolean indexing keeps row-major order
        "token_type_ids": batch["token_type_ids"][mask],
        "position_ids": positions[mask],
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(lengths.max()) if len(lengths) else 0,
    }
    if "labels" in batch:
        packed["labels"] = batch["labels"]
    return packed


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, fill=0) -> torch.Tensor:
    """Packed (T, ...) -> padded (B, max_seqlen, ...), e.g. to turn varlen outputs back into a batch."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    mask = torch.arange(max_seqlen, device=values.device) < lengths[:, None]
    out = values.new_full((len(lengths), max_seqlen, *values.shape[1:]), fill)
    out[mask] = values
    return out


def to_padded(packed: dict, pad_id: int = 0) -> dict:
    """Inverse of to_packed."""
    cu, max_len = packed["cu_seqlens"], packed["max_seqlen"]
    lengths = (cu[1:] - cu[:-1]).long()
    batch = {
        "input_ids": unpack(packed["input_ids"], cu, max_len, fill=pad_id),
        "attention_mask": (torch.arange(max_len, device=cu.device) < lengths[:, None]).long(),
        "token_type_ids": unpack(packed["token_type_ids"], cu, max_len),
    }
    if "labels" in packed:
        batch["labels"] = packed["labels"]
    return batch


def padding_fraction(batches: Iterable) -> float:
    """Share of padded positions over all batches (0 = none). A batch is a padded dict with
    'attention_mask', or a sequence of its examples' lengths."""
    real = total = 0
    for batch in batches:
        if isinstance(batch, dict):
            mask = batch["attention_mask"]
            real += int(mask.sum())
            total += mask.numel()
        else:
            lengths = [int(n) for n in batch]
            real += sum(lengths)
            total += len(lengths) * max(lengths, default=0)
    return 1.0 - real / total if total else 0.0
