"""Pair features (cross / bi / both): the stacked batch layout against encoding the pieces by
hand, every forward path (forward, heads_from_embeddings / SMART, packed, bf16 autocast), the
warm start on the cosine feature, and pooling / pair_features in checkpoints."""

import json

import pytest
import torch
import torch.nn.functional as F

from smarter_fast.model import BertConfig, BertModel, MultitaskBert, save_checkpoint
from smarter_fast.regularizers.smart import smart_full_loss, smart_simple_loss

H = 24
VOCAB = 41


def small_model(pooling="mean", pair_features="both", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=13, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return MultitaskBert(BertModel(cfg, backend="ref"), dropout=dropout, pooling=pooling,
                         pair_features=pair_features).eval()


def padded(seqs, types=None):
    """Right-padded (ids, mask, token types) of lists of ids."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    tt = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        if types is not None:
            tt[i, :len(s)] = torch.tensor(types[i])
    return ids, mask, tt


def random_pairs(B=3, seed=1):
    """B random pairs (odd lengths): token lists of s1, s2 and the cross sequence with types."""
    g = torch.Generator().manual_seed(seed)
    s1 = [torch.randint(5, VOCAB, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
          for _ in range(B)]
    s2 = [torch.randint(5, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
          for _ in range(B)]
    cls, sep = 2, 3
    single1 = [[cls, *a, sep] for a in s1]
    single2 = [[cls, *b, sep] for b in s2]
    cross = [[cls, *a, sep, *b, sep] for a, b in zip(s1, s2)]
    cross_types = [[0] * (len(a) + 2) + [1] * (len(b) + 1) for a, b in zip(s1, s2)]
    return single1, single2, cross, cross_types


def stacked_batch(pair_features, B=3, seed=1):
    """One padded batch in the model's layout: [s1; s2] (bi) or [pair; s1; s2] (both)."""
    s1, s2, cross, cross_types = random_pairs(B, seed)
    rows = (cross if pair_features == "both" else []) + s1 + s2
    types = (cross_types if pair_features == "both" else []) + [[0] * len(s) for s in s1 + s2]
    return padded(rows, types)


def by_hand(model, task, B=3, seed=1):
    """The expected output: s1, s2 (and the cross sequence) encoded in separate encoder calls,
    pooled, features built explicitly, then the head's Linear."""
    s1, s2, cross, cross_types = random_pairs(B, seed)

    def pooled(seqs, types=None):
        ids, mask, tt = padded(seqs, types)
        out = model.bert(ids, mask, tt)
        if model.pooling == "cls":
            return out["pooler_output"]
        m = mask[:, :, None].float()
        return (out["last_hidden_state"] * m).sum(1) / m.sum(1)

    u, v = pooled(s1), pooled(s2)
    feats = [u * v, (u - v).abs(), F.cosine_similarity(u, v, dim=-1)[:, None]]
    if model.pair_features == "both":
        feats.insert(0, pooled(cross, cross_types))
    return getattr(model, task)(torch.cat(feats, dim=-1)).squeeze(-1)


@pytest.mark.parametrize("pair_features", ["bi", "both"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("task", ["paraphrase", "similarity"])
def test_stacked_batch_matches_pieces_encoded_by_hand(pair_features, pooling, task):
    model = small_model(pooling, pair_features)
    B = 3
    ids, mask, tt = stacked_batch(pair_features, B)
    assert ids.shape[0] == model.rows_per_example(task) * B
    with torch.no_grad():
        got = model(task, ids, mask, tt)
        expect = by_hand(model, task, B)
        # heads_from_embeddings (the SMART entry point) takes the same stacked rows
        via_embeddings = model.heads_from_embeddings(task, model.bert.embed(ids, tt), mask)
    assert got.shape == (B,)
    assert (got - expect).abs().max() <= 1e-5
    assert torch.equal(via_embeddings, got)
    # sentiment is unaffected: one row per sentence, Linear(H, 5)
    assert model.sentiment.in_features == H and model.rows_per_example("sst") == 1


def test_head_sizes_and_warm_start_on_cosine():
    assert small_model(pair_features="cross").similarity.in_features == H
    bi, both = small_model(pair_features="bi"), small_model(pair_features="both")
    assert bi.similarity.in_features == bi.paraphrase.in_features == 2 * H + 1
    assert both.similarity.in_features == both.paraphrase.in_features == 3 * H + 1
    for m in (bi, both):
        assert m.similarity.weight[0, -1].item() == 5.0 and m.similarity.bias.item() == 0.0
        assert m.paraphrase.weight[0, -1].item() == 10.0 and m.paraphrase.bias.item() == -7.0
        # everything else: the default Linear init (bound 1/sqrt(fan_in))
        assert m.similarity.weight[0, :-1].abs().max() <= m.similarity.in_features ** -0.5
    # cross keeps the plain default init
    assert small_model(pair_features="cross").similarity.weight.abs().max() <= H ** -0.5


def test_odd_row_count_is_a_clear_error():
    model = small_model(pair_features="both")
    ids, mask, tt = stacked_batch("bi", B=2)  # 4 rows: not a multiple of 3
    with pytest.raises(ValueError, match="3 rows per example"):
        model("similarity", ids, mask, tt)
    with pytest.raises(ValueError, match="pair_features"):
        small_model(pair_features="siamese")


@pytest.mark.parametrize("pair_features", ["bi", "both"])
def test_gradients_reach_the_encoder_through_every_block(pair_features):
    model = small_model("mean", pair_features, dropout=0.1).train()
    ids, mask, tt = stacked_batch(pair_features, B=3)
    E = model.bert.embed(ids, tt)
    E.retain_grad()
    out = model.heads_from_embeddings("similarity", E, mask)
    (out.sum() + model("paraphrase", ids, mask, tt).sum()).backward()
    # every row (pair, s1 and s2 blocks) gets gradient
    assert (E.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert model.bert.embeddings.word.weight.grad.abs().sum() > 0
    assert model.bert.layers[0].qkv.weight.grad.abs().sum() > 0
    assert model.similarity.weight.grad.abs().sum() > 0 and model.paraphrase.weight.grad is not None


@pytest.mark.parametrize("pair_features", ["bi", "both"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_matches_padded(pair_features, pooling):
    model = small_model(pooling, pair_features)
    ids, mask, tt = stacked_batch(pair_features, B=3)
    real = mask.bool()
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    with torch.no_grad():
        for task in ("paraphrase", "similarity"):
            want = model(task, ids, mask, tt)
            got = model.forward_packed(task, ids[real], cu, int(lengths.max()), tt[real])
            assert got.shape == want.shape == (3,)
            assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("pair_features", ["bi", "both"])
def test_bf16_autocast(pair_features):
    model = small_model("mean", pair_features)
    ids, mask, tt = stacked_batch(pair_features, B=3)
    with torch.no_grad():
        want = model("similarity", ids, mask, tt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model("similarity", ids, mask, tt)
    assert got.shape == (3,)
    assert (got.float() - want).abs().max() < 0.1


def smart_batch(pair_features, task, B=3):
    ids, mask, tt = stacked_batch(pair_features, B)
    labels = torch.tensor([0.0, 1.0, 1.0]) if task == "quora" else torch.tensor([0.5, 4.0, 2.5])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt, "labels": labels}


@pytest.mark.parametrize("pair_features", ["bi", "both"])
@pytest.mark.parametrize("task", ["quora", "sts"])
def test_smart_simple_fused_matches_two_passes(pair_features, task):
    """SMART perturbs the embeddings of all stacked rows; the fused 2x batch (the CUDA default)
    must keep the [pair; s1; s2] blocks of each half together: same loss and gradients."""
    results = []
    for fuse in (False, True):
        model = small_model("mean", pair_features).train()
        total, loss, term, clean = smart_simple_loss(model, task, smart_batch(pair_features, task),
                                                     sigma=0.3, lam=10.0, seed=7, fuse_batch=fuse)
        assert clean.shape == (3,) and term.item() > 0
        total.backward()
        results.append((total.detach(), term.detach(), clean.detach(),
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        assert model.bert.embeddings.word.weight.grad.abs().sum() > 0
    (t0, m0, c0, g0), (t1, m1, c1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):  # fp32 sums in another order: relative to the largest entry
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    # the clean output is the plain forward's
    model = small_model("mean", pair_features)
    b = smart_batch(pair_features, task)
    head = "paraphrase" if task == "quora" else "similarity"
    with torch.no_grad():
        torch.testing.assert_close(c0, model(head, b["input_ids"], b["attention_mask"],
                                             b["token_type_ids"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pair_features", ["bi", "both"])
def test_smart_full_loss_runs_and_backpropagates(pair_features):
    model = small_model("mean", pair_features).train()
    total, loss, term, clean = smart_full_loss(model, "sts", smart_batch(pair_features, "sts"),
                                               sigma=1e-3, eta=1e-2, steps=2, seed=3)
    assert clean.shape == (3,) and torch.isfinite(total)
    total.backward()
    assert model.bert.embeddings.word.weight.grad.abs().sum() > 0
    assert model.similarity.weight.grad.abs().sum() > 0


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling,pair_features", [("mean", "both"), ("cls", "bi"), ("mean", "cross")])
def test_checkpoint_round_trip_restores_options_and_outputs(tmp_path, pooling, pair_features):
    model = small_model(pooling, pair_features)
    with torch.no_grad():
        model.similarity.weight.add_(0.5)  # heads differ from any fresh init
        model.paraphrase.bias.add_(0.25)
    model.save_pretrained(tmp_path / "mt")
    cfg = json.loads((tmp_path / "mt" / "config.json").read_text())
    assert cfg["smarter_fast_pooling"] == pooling and cfg["smarter_fast_pair_features"] == pair_features
    again = MultitaskBert.from_pretrained(tmp_path / "mt", backend="ref")
    assert (again.pooling, again.pair_features) == (pooling, pair_features)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask, tt = stacked_batch(pair_features if pair_features != "cross" else "bi", B=3)
    if pair_features == "cross":
        ids, mask, tt = ids[:3], mask[:3], tt[:3]
    with torch.no_grad():
        for task in ("paraphrase", "similarity"):
            assert torch.equal(model(task, ids, mask, tt), again(task, ids, mask, tt))
        assert torch.equal(model("sentiment", ids[:3], mask[:3]), again("sentiment", ids[:3], mask[:3]))
    # an explicit pooling wins over the saved one (pooling has no weights of its own)
    other = "cls" if pooling == "mean" else "mean"
    assert MultitaskBert.from_pretrained(tmp_path / "mt", pooling=other).pooling == other
    assert MultitaskBert.resolve_options(tmp_path / "mt") == {"pooling": pooling,
                                                              "pair_features": pair_features,
                                                              "pair_order": "given"}


def test_plain_bert_dir_loads_as_cls_cross_and_takes_explicit_options(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=1, num_attention_heads=3,
                     intermediate_size=13, max_position_embeddings=32)
    save_checkpoint(BertModel(cfg), tmp_path / "plain", cfg)
    keys = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not any(k.startswith("smarter_fast_") for k in keys)  # a bare encoder adds nothing
    model = MultitaskBert.from_pretrained(tmp_path / "plain")
    assert (model.pooling, model.pair_features) == ("cls", "cross")
    assert model.similarity.in_features == H
    bi = MultitaskBert.from_pretrained(tmp_path / "plain", pooling="mean", pair_features="bi")
    assert (bi.pooling, bi.pair_features) == ("mean", "bi")
    assert bi.similarity.in_features == 2 * H + 1 and bi.similarity.weight[0, -1].item() == 5.0


def test_requested_pair_features_that_do_not_fit_the_saved_heads(tmp_path):
    small_model("mean", "both").save_pretrained(tmp_path / "both")
    with pytest.raises(ValueError, match="pair_features='both'.*pair_features='bi'"):
        MultitaskBert.from_pretrained(tmp_path / "both", pair_features="bi")
    small_model("cls", "cross").save_pretrained(tmp_path / "cross")
    with pytest.raises(ValueError, match="paraphrase.weight") as info:
        MultitaskBert.from_pretrained(tmp_path / "cross", pair_features="both")
    assert "pair_features='cross'" in str(info.value)
    # the same options as saved are fine
    assert MultitaskBert.from_pretrained(tmp_path / "both", pair_features="both").pair_features == "both"


def test_config_keys_are_checked_and_ignored_by_bert_loaders(tmp_path):
    small_model("mean", "bi").save_pretrained(tmp_path / "mt")
    # our bare-encoder loader ignores the keys (and warns about the head tensors only)
    with pytest.warns(UserWarning, match="similarity.weight"):
        BertModel.from_pretrained(tmp_path / "mt")
    cfg_file = tmp_path / "mt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["smarter_fast_pair_features"] = "siamese"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="smarter_fast_pair_features"):
        MultitaskBert.from_pretrained(tmp_path / "mt")


def test_transformers_reads_a_bi_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = small_model("mean", "both")
    model.save_pretrained(tmp_path / "mt")
    hf = transformers.BertModel.from_pretrained(tmp_path / "mt").eval()
    ids, mask, tt = stacked_batch("bi", B=2)
    with torch.no_grad():
        ours = model.bert(ids, mask, tt)["last_hidden_state"]
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-4
