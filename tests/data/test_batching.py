"""Length-bucketed batching, dynamic padding and the packed (varlen) form."""

from pathlib import Path

import numpy as np
import pytest
import torch

from smarter_fast.data import (
    EncodedDataset,
    LengthBucketSampler,
    collate,
    pad_batch,
    padding_fraction,
    random_batch_sampler,
    to_packed,
    to_padded,
)

DATA = Path(__file__).parents[2].parent / "shared/data/cs224n"


def fake_lengths(n=2000, seed=0):
    """Sentence-like token counts: skewed, 3 to 128."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(3.0, 0.6, n).astype(int), 3, 128)


@pytest.mark.parametrize("n,batch_size,pool,drop_last", [(2000, 32, 50, False), (1001, 32, 7, False),
                                                          (1001, 32, 7, True), (5, 8, 3, False), (64, 32, 1, False)])
def test_every_example_exactly_once(n, batch_size, pool, drop_last):
    sampler = LengthBucketSampler(fake_lengths(n), batch_size, pool_batches=pool, seed=3, drop_last=drop_last)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        if drop_last:
            assert all(len(b) == batch_size for b in batches) and len(flat) == n - n % batch_size
        else:
            assert sorted(flat) == list(range(n))
            assert sum(len(b) < batch_size for b in batches) <= 1


def test_deterministic_per_seed_and_epoch():
    lengths = fake_lengths()

    def order(seed, epoch):
        s = LengthBucketSampler(lengths, 32, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0) == order(1, 0) and order(1, 5) == order(1, 5)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    s = LengthBucketSampler(lengths, 32, shuffle=False)
    assert list(s) == list(s)


def test_batches_are_length_sorted_within_pools():
    lengths = fake_lengths()
    sampler = LengthBucketSampler(lengths, 32, pool_batches=50, shuffle=False)
    batches = list(sampler)
    pool = batches[:50]  # first pool, in order when not shuffled
    flat = [lengths[i] for b in pool for i in b]
    assert flat == sorted(flat)


def test_padding_much_lower_than_random():
    lengths = fake_lengths(5000)
    bucketed = padding_fraction([[lengths[i] for i in b] for b in LengthBucketSampler(lengths, 32, seed=0)])
    random = padding_fraction([[lengths[i] for i in b] for b in random_batch_sampler(len(lengths), 32, seed=0)])
    assert random > 0.3 and bucketed < 0.1 and bucketed < random / 5


def test_random_sampler_is_unsorted():
    lengths = fake_lengths()
    batches = list(random_batch_sampler(len(lengths), 32, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert any(list(lengths[b]) != sorted(lengths[b]) for b in map(np.array, batches))


def test_collate_pads_to_batch_max():
    ds = EncodedDataset([[101, 5, 6, 102], [101, 7, 102]], [[0, 0, 0, 0], [0, 1, 1]], labels=[3, 1])
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids"].tolist() == [[101, 5, 6, 102], [101, 7, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0]]
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "attention_mask", "token_type_ids", "labels"))
    assert pad_batch([[1, 2]], labels=[2.5])["labels"].dtype == torch.float32
    assert "labels" not in collate([EncodedDataset([[1, 2]])[0]])
    assert padding_fraction([batch]) == pytest.approx(1 / 8)


def test_dataloader_with_bucket_sampler():
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(1000, 2000, n)) for n in fake_lengths(300)]
    ds = EncodedDataset(ids, labels=list(range(300)))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=LengthBucketSampler(ds.lengths, 16), collate_fn=collate)
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()
        seen += batch["labels"].tolist()
    assert sorted(seen) == list(range(300))


def test_packed_round_trip():
    rng = np.random.default_rng(1)
    lengths = [5, 1, 9, 3]
    ids = [list(rng.integers(1, 30000, n)) for n in lengths]
    type_ids = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    batch = pad_batch(ids, type_ids, labels=[0, 1, 2, 3])
    packed = to_packed(batch)
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == [0, 5, 6, 15, 18]
    assert packed["max_seqlen"] == 9
    assert packed["input_ids"].tolist() == [t for seq in ids for t in seq]
    assert packed["token_type_ids"].tolist() == [t for seq in type_ids for t in seq]
    assert packed["position_ids"].tolist() == [p for n in lengths for p in range(n)]
    back = to_padded(packed)
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(back[key], batch[key]), key


def test_packed_rejects_left_padding():
    batch = pad_batch([[1, 2, 3], [4]])
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        to_packed(batch)


@pytest.mark.real_data
def test_real_sst_padding():
    """SST train in batches of 32: about half padding at random, a few percent bucketed."""
    if not DATA.is_dir():
        pytest.skip(f"real CS224N data not found at {DATA}")
    from smarter_fast.data import encode_sentences, load_cs224n, load_tokenizer

    ids, _ = encode_sentences(load_tokenizer(), [e.sentence for e in load_cs224n(DATA, "train").sst])
    lengths = np.array([len(x) for x in ids])
    random = padding_fraction([lengths[b] for b in random_batch_sampler(len(lengths), 32, seed=0)])
    bucketed = padding_fraction([lengths[b] for b in LengthBucketSampler(lengths, 32, seed=0)])
    assert random > 0.45 and bucketed < 0.06
