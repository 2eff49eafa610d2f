"""minBERT against transformers.BertModel (eval, fp32), and padded vs packed paths."""

import pytest
import torch

from smarter_fast.model import BertConfig, BertModel
from smarter_fast.model.bert import packed_position_ids

transformers = pytest.importorskip("transformers")

TOL_HF = 1e-4  # docs/design.md, "Ops and their contracts"
TOL_PACKED = 1e-5


def make_batch(vocab_size, lengths, seed=0, pairs=True):
    """Random ids with real padding: (B, L) ids, mask, token types; lengths odd and uneven."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # (B, L)
    ids = torch.randint(1, vocab_size, (B, L), generator=g) * mask
    tt = torch.zeros_like(ids)
    if pairs:  # second segment from the middle of each sequence on
        tt = (torch.arange(L)[None, :] >= (lengths[:, None] // 2)).long() * mask
    return ids, mask, tt


def pack(ids, mask, tt):
    real = mask.bool()
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return ids[real], cu, int(lengths.max()), tt[real]


def max_diffs(ours, ref_hidden, ref_pooled, mask):
    real = mask.bool()
    return ((ours["last_hidden_state"][real] - ref_hidden[real]).abs().max().item(),
            (ours["pooler_output"] - ref_pooled).abs().max().item())


@pytest.fixture(scope="module")
def embedded():
    from smarter_fast.model.checkpoint import default_checkpoint_dir
    ours = BertModel.from_pretrained()
    hf = transformers.BertModel.from_pretrained(str(default_checkpoint_dir()),
                                                attn_implementation="eager").eval()
    return ours, hf


@pytest.fixture(scope="module")
def base_shaped(tmp_path_factory):
    """A random bert-base-shaped checkpoint (hidden 768, 12 heads; 2 layers and a small
    vocabulary for speed) written by transformers' save_pretrained."""
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=2,
                                  num_attention_heads=12, intermediate_size=3072,
                                  max_position_embeddings=128, attn_implementation="eager")
    hf = transformers.BertModel(cfg).eval()
    directory = tmp_path_factory.mktemp("bert_base_shaped")
    hf.save_pretrained(directory)
    return directory, hf


def test_embedded_matches_transformers(embedded):
    ours, hf = embedded
    ids, mask, tt = make_batch(ours.config.vocab_size, [17, 9, 3, 13], seed=2)
    with torch.no_grad():
        out = ours(ids, mask, tt)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert out["last_hidden_state"].shape == (4, 17, 384)
    assert out["pooler_output"].shape == (4, 384)
    d_hidden, d_pooled = max_diffs(out, ref.last_hidden_state, ref.pooler_output, mask)
    print(f"embedded MiniLM: max|diff| hidden {d_hidden:.2e} pooled {d_pooled:.2e}")
    assert d_hidden <= TOL_HF and d_pooled <= TOL_HF


def test_base_shaped_matches_transformers(base_shaped):
    directory, hf = base_shaped
    ours = BertModel.from_pretrained(directory)
    assert ours.config.hidden_size == 768 and ours.config.num_attention_heads == 12
    ids, mask, tt = make_batch(1000, [11, 5, 7], seed=3)
    with torch.no_grad():
        out = ours(ids, mask, tt)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    d_hidden, d_pooled = max_diffs(out, ref.last_hidden_state, ref.pooler_output, mask)
    print(f"bert-base-shaped: max|diff| hidden {d_hidden:.2e} pooled {d_pooled:.2e}")
    assert d_hidden <= TOL_HF and d_pooled <= TOL_HF


def test_token_type_ids_default_to_zero(embedded):
    ours, hf = embedded
    ids, mask, _ = make_batch(ours.config.vocab_size, [7, 4], seed=4)
    with torch.no_grad():
        a = ours(ids, mask)
        b = ours(ids, mask, torch.zeros_like(ids))
        ref = hf(input_ids=ids, attention_mask=mask)
    assert max(max_diffs(a, b["last_hidden_state"], b["pooler_output"], mask)) <= 1e-5
    assert max(max_diffs(a, ref.last_hidden_state, ref.pooler_output, mask)) <= TOL_HF


@pytest.mark.parametrize("lengths", [[13, 1, 6, 9], [5], [8, 8]])
def test_packed_matches_padded(embedded, lengths):
    ours, _ = embedded
    ids, mask, tt = make_batch(ours.config.vocab_size, lengths, seed=len(lengths))
    flat, cu, max_len, flat_tt = pack(ids, mask, tt)
    with torch.no_grad():
        padded = ours(ids, mask, tt)
        packed = ours.forward_packed(flat, cu, max_len, flat_tt)
    assert packed["last_hidden_state"].shape == (int(cu[-1]), 384)
    assert packed["pooler_output"].shape == (len(lengths), 384)
    d_hidden = (packed["last_hidden_state"] - padded["last_hidden_state"][mask.bool()]).abs().max()
    d_pooled = (packed["pooler_output"] - padded["pooler_output"]).abs().max()
    assert d_hidden <= TOL_PACKED and d_pooled <= TOL_PACKED


def test_packed_position_ids_restart():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert packed_position_ids(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_embed_then_encode_equals_forward_and_hook(embedded):
    ours, _ = embedded
    ids, mask, tt = make_batch(ours.config.vocab_size, [9, 6], seed=5)
    with torch.no_grad():
        E = ours.embed(ids, tt)
        split = ours.encode(E, mask)
        full = ours(ids, mask, tt)
        hooked = ours(ids, mask, tt, embeddings_hook=lambda e: e + 0.1)
        shifted = ours.encode(E + 0.1, mask)
    assert E.shape == (2, 9, 384)
    assert torch.equal(split["last_hidden_state"], full["last_hidden_state"])
    assert torch.equal(hooked["pooler_output"], shifted["pooler_output"])
    assert not torch.equal(hooked["pooler_output"], full["pooler_output"])


def test_any_head_count_padded_vs_packed_and_gradients():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=60, num_hidden_layers=2, num_attention_heads=5,
                     intermediate_size=37, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    ids, mask, tt = make_batch(50, [7, 3, 5], seed=6)
    flat, cu, max_len, flat_tt = pack(ids, mask, tt)
    with torch.no_grad():
        padded = model(ids, mask, tt)
        packed = model.forward_packed(flat, cu, max_len, flat_tt)
    assert (packed["last_hidden_state"] - padded["last_hidden_state"][mask.bool()]).abs().max() \
        <= TOL_PACKED
    model.train()  # dropout on; gradients reach every parameter
    out = model(ids, mask, tt)
    (out["last_hidden_state"][mask.bool()].sum() + out["pooler_output"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_dict_round_trip_and_checks():
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    d = cfg.to_dict()
    assert d["model_type"] == "bert" and BertConfig.from_dict(d) == cfg
    assert BertConfig.from_dict({**d, "unknown_key": 1, "use_cache": True}) == cfg
    with pytest.raises(ValueError, match="multiple"):
        BertConfig(hidden_size=65, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_dict({**d, "position_embedding_type": "relative_key"})
