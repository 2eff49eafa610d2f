"""MultitaskBert: output shapes, pooling, the SMART entry point and the packed path."""

import pytest
import torch

from smarter_fast.model import BertConfig, BertModel, MultitaskBert


def make_batch(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab_size, (B, L), generator=g) * mask
    tt = (torch.arange(L)[None, :] >= (lengths[:, None] // 2)).long() * mask
    return ids, mask, tt


def small_model(pooling="cls", dropout=0.0):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=13, max_position_embeddings=32)
    return MultitaskBert(BertModel(cfg), dropout=dropout, pooling=pooling).eval()


def test_embedded_default_shapes():
    model = MultitaskBert.from_pretrained()
    ids, mask, tt = make_batch(model.config.vocab_size, [7, 3, 5])
    with torch.no_grad():
        assert model.predict_sentiment(ids, mask).shape == (3, 5)
        assert model.predict_paraphrase(ids, mask, tt).shape == (3,)
        assert model.predict_similarity(ids, mask, tt).shape == (3,)
    assert not model.training


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling(pooling):
    model = small_model(pooling)
    ids, mask, tt = make_batch(40, [5, 2, 6])
    with torch.no_grad():
        out = model.bert(ids, mask, tt)
        if pooling == "cls":
            pooled = out["pooler_output"]
        else:  # mean over real tokens only
            pooled = torch.stack([out["last_hidden_state"][i, :n].mean(0)
                                  for i, n in enumerate(mask.sum(1).tolist())])
        expect = model.similarity(pooled).squeeze(-1)
        got = model.predict_similarity(ids, mask, tt)
    assert torch.allclose(got, expect, atol=1e-6)


def test_heads_from_embeddings_is_the_smart_entry_point():
    model = small_model()
    ids, mask, tt = make_batch(40, [4, 7])
    with torch.no_grad():
        E = model.bert.embed(ids, tt)
        assert torch.equal(model.heads_from_embeddings("sentiment", model.bert.embed(ids), mask),
                           model.predict_sentiment(ids, mask))
        assert torch.equal(model.heads_from_embeddings("paraphrase", E, mask),
                           model.predict_paraphrase(ids, mask, tt))
        assert torch.equal(model.heads_from_embeddings("similarity", E, mask),
                           model.predict_similarity(ids, mask, tt))
        noisy = model.heads_from_embeddings("sts", E + 0.01 * torch.randn_like(E), mask)
    assert noisy.shape == (2,) and not torch.equal(noisy, model.predict_similarity(ids, mask, tt))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_matches_padded(pooling):
    model = small_model(pooling)
    ids, mask, tt = make_batch(40, [9, 1, 4])
    real = mask.bool()
    cu = torch.tensor([0, 9, 10, 14], dtype=torch.int32)
    with torch.no_grad():
        for task in ("sentiment", "paraphrase", "similarity"):
            padded = model(task, ids, mask, tt)
            packed = model.forward_packed(task, ids[real], cu, 9, tt[real])
            assert packed.shape == padded.shape
            assert (packed - padded).abs().max() <= 1e-5


def test_dropout_and_gradients_in_training():
    model = small_model(dropout=0.3).train()
    ids, mask, tt = make_batch(40, [6, 3])
    a = model.predict_sentiment(ids, mask)
    b = model.predict_sentiment(ids, mask)
    assert not torch.equal(a, b)  # dropout active
    (a.sum() + model.predict_paraphrase(ids, mask, tt).sum()
     + model.predict_similarity(ids, mask, tt).sum()).backward()
    assert model.sentiment.weight.grad is not None and model.similarity.weight.grad is not None
    assert model.bert.embeddings.word.weight.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="pooling"):
        small_model(pooling="max")
    model = small_model()
    ids, mask, _ = make_batch(40, [3])
    with pytest.raises(ValueError, match="unknown task"):
        model("nli", ids, mask)
