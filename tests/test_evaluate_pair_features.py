"""Pair layouts in the data (EncodedTask / encode_split) and `--pooling` / `--pair-features` end to
end: train, checkpoint, `python -m smarter_fast.evaluate` on it. `--pair-order symmetric`: pairs
encoded in both orders, trained in a random order per example, predicted as the mean over both
orders, saved with the checkpoint; with `--ema` (smarter_fast.regularizers.ema) on top."""

import json

import numpy as np
import pytest
import torch

from smarter_fast.data.tokenize import encode_pairs, encode_sentences, load_tokenizer
from smarter_fast.evaluation import EncodedTask, encode_split, model_outputs

TINY_SIZES = {
    "sst": {"train": 15, "dev": 9, "test-student": 5},
    "quora": {"train": 21, "dev": 11, "test-student": 5},
    "sts": {"train": 13, "dev": 9, "test-student": 5},
}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(TINY_SIZES, name="tiny_pairs")


class _Example:
    def __init__(self, i, s1, s2, label):
        self.id, self.sentence1, self.sentence2, self.label, self.sentence = f"id{i}", s1, s2, label, s1


def examples(n=7, seed=1):
    words = "the a cat dog sat on mat big small red".split()
    rng = np.random.default_rng(seed)
    return [_Example(i, " ".join(rng.choice(words, rng.integers(1, 12))),
                     " ".join(rng.choice(words, rng.integers(1, 5))), float(i % 5)) for i in range(n)]


def rows(batch):
    """The real tokens (ids, types) of each row of a padded batch."""
    out = []
    for ids, tt, m in zip(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]):
        n = int(m.sum())
        out.append((ids[:n].tolist(), tt[:n].tolist()))
    return out


@pytest.mark.parametrize("pair_features", ["cross", "bi", "both"])
def test_encoded_pairs_stack_blocks_of_b_rows(tiny, pair_features):
    tok = load_tokenizer(tiny[0], max_length=32)
    ex = examples()
    s1, s2 = [e.sentence1 for e in ex], [e.sentence2 for e in ex]
    pair, one, two = encode_pairs(tok, s1, s2), encode_sentences(tok, s1), encode_sentences(tok, s2)
    data = EncodedTask("sts", ex, tok, pair_features)
    assert len(data) == 7 and data.pair_features == pair_features
    idx = [5, 0, 3]
    b = data.batch(idx)
    blocks = {"cross": [pair], "bi": [one, two], "both": [pair, one, two]}[pair_features]
    assert data.rows_per_example == len(blocks)
    assert b["input_ids"].shape[0] == len(blocks) * len(idx)
    assert b["labels"].tolist() == [float(i % 5) for i in idx]  # one label per example
    want = [(ids[i], types[i]) for ids, types in blocks for i in idx]
    assert rows(b) == want
    if pair_features != "cross":  # separately encoded sentences: [CLS] s [SEP], type 0 only
        assert all(set(t) == {0} and ids[0] == tok.token_to_id("[CLS]")
                   for ids, t in rows(b)[-2 * len(idx):])
    # lengths (for length bucketing): the pair's, or the longer sentence's (bi)
    if pair_features == "bi":
        assert data.lengths.tolist() == [max(len(a), len(c)) for a, c in zip(one[0], two[0])]
    else:
        assert data.lengths.tolist() == [len(x) for x in pair[0]]
    # sentiment stays one row per sentence whatever the pair layout
    sst = EncodedTask("sst", ex, tok, pair_features)
    assert sst.batch(idx)["input_ids"].shape[0] == 3 and sst.rows_per_example == 1


@pytest.mark.parametrize("pair_features", ["bi", "both"])
def test_model_outputs_in_stacked_layout_keep_example_order(tiny, pair_features):
    from smarter_fast.model import MultitaskBert
    tok = load_tokenizer(tiny[0], max_length=32)
    model = MultitaskBert.from_pretrained(tiny[0], pooling="mean", pair_features=pair_features,
                                          backend="ref")
    data = EncodedTask("quora", examples(11), tok, pair_features)
    batched = model_outputs(model, data, batch_size=4)
    with torch.no_grad():
        single = [model.predict_paraphrase(**{k: v for k, v in data.batch([i]).items()
                                              if k != "labels"}).item() for i in range(len(data))]
    assert batched.shape == (11,)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with pytest.raises(ValueError, match="pair_features"):  # data in another layout
        model_outputs(model, EncodedTask("quora", examples(3), tok, "cross"))


def test_bad_pair_features():
    with pytest.raises(ValueError, match="pair_features"):
        EncodedTask("sts", [], None, "siamese")


def test_train_both_mean_then_evaluate_cli(tiny, tmp_path, capsys):
    from smarter_fast.data.cs224n import load_cs224n
    from smarter_fast.evaluate import main as evaluate_main
    from smarter_fast.model import MultitaskBert
    from smarter_fast.train import main as train_main
    ckpt, data = tiny
    out = tmp_path / "run"
    base = ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--batch-size", "4",
            "--eval-batch-size", "5", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1",
            "--split-parts", "1"]
    assert train_main([*base, "--epochs", "2", "--pair-features", "both", "--pooling", "mean",
                       "--smart", "simple"]) == 0
    stdout = capsys.readouterr().out
    assert "model: pooling mean, pair features both" in stdout
    best = out / "checkpoints" / "best"
    cfg = json.loads((best / "config.json").read_text())
    assert cfg["smarter_fast_pooling"] == "mean" and cfg["smarter_fast_pair_features"] == "both"
    args = json.loads((out / "args.json").read_text())
    assert args["pooling"] == "mean" and args["pair_features"] == "both"
    model = MultitaskBert.from_pretrained(best)
    assert (model.pooling, model.pair_features) == ("mean", "both")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(r["train_loss_quora"] is not None for r in metrics)
    run_best = json.loads((out / "dev_metrics.json").read_text())
    for f in ("para-dev-output.csv", "para-test-output.csv", "sts-test-output.csv"):
        assert (out / "predictions" / f).is_file()
    assert len((out / "predictions" / "para-test-output.csv").read_text().splitlines()) == 1 + 5

    # the evaluate CLI restores pooling / pair layout from the checkpoint: the same dev metrics
    ev = tmp_path / "ev"
    assert evaluate_main(["--checkpoint", str(best), "--data-dir", str(data), "--out", str(ev),
                          "--num-threads", "1", "--batch-size", "3"]) == 0
    got = json.loads((ev / "dev_metrics.json").read_text())
    for key in ("sst_acc", "quora_acc"):
        assert got[key] == run_best[key], key
    assert got["sts_pearson"] == pytest.approx(run_best["sts_pearson"], abs=1e-4)
    assert (ev / "predictions" / "para-dev-output.csv").read_text() == \
        (out / "predictions" / "para-dev-output.csv").read_text()
    # and the model's outputs are the in-memory model's, whatever the batching
    dev = encode_split(load_cs224n(data, "dev"), load_tokenizer(best, max_length=48), "both")
    a = model_outputs(model, dev["sts"], batch_size=2)
    b = model_outputs(model, dev["sts"], batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5)

    # resuming keeps the checkpoint's options; asking for others is a clean error
    assert train_main([*base, "--epochs", "3", "--resume"]) == 0
    cfg = json.loads((out / "checkpoints" / "last" / "config.json").read_text())
    assert cfg["smarter_fast_pair_features"] == "both"
    capsys.readouterr()
    assert train_main([*base, "--epochs", "4", "--resume", "--pair-features", "bi"]) == 2
    assert "trained with --pair-features both" in capsys.readouterr().err
    # starting from the trained checkpoint with pair heads of another size: one clean line
    assert train_main([*base[:2], "--pretrained", str(best), "--out", str(tmp_path / "other"),
                       *base[6:], "--epochs", "1", "--pair-features", "bi"]) == 2
    assert "cannot load the checkpoint" in capsys.readouterr().err


# ---- --pair-order symmetric and --ema ----------------------------------------------------------
@pytest.mark.parametrize("pair_features", ["cross", "bi", "both"])
def test_swap_mask_takes_the_reversed_pair_per_example(tiny, pair_features):
    tok = load_tokenizer(tiny[0], max_length=32)
    ex = examples(9, seed=3)
    s1, s2 = [e.sentence1 for e in ex], [e.sentence2 for e in ex]
    fwd = {"cross": [encode_pairs(tok, s1, s2)], "bi": [encode_sentences(tok, s1), encode_sentences(tok, s2)]}
    rev = {"cross": [encode_pairs(tok, s2, s1)], "bi": [encode_sentences(tok, s2), encode_sentences(tok, s1)]}
    fwd["both"], rev["both"] = fwd["cross"] + fwd["bi"], rev["cross"] + rev["bi"]
    data = EncodedTask("quora", ex, tok, pair_features, both_orders=True)
    idx, swap = [7, 2, 4, 0], np.array([True, False, True, False])
    want = [((r if s else f)[0][i], (r if s else f)[1][i])
            for f, r in zip(fwd[pair_features], rev[pair_features]) for i, s in zip(idx, swap)]
    assert rows(data.batch(idx, swap=swap)) == want
    assert rows(data.batch(idx)) == rows(data.batch(idx, swap=np.zeros(4, bool)))  # None: given order
    assert data.batch(idx, swap=swap)["labels"].tolist() == [float(i % 5) for i in idx]
    with pytest.raises(ValueError, match="not encoded"):
        EncodedTask("quora", ex, tok, pair_features).batch(idx, swap=swap)
    # sentences stay as they are
    assert EncodedTask("sst", ex, tok, pair_features, both_orders=True).swapped_parts is None


def test_symmetric_outputs_are_the_mean_of_both_orders(tiny):
    from smarter_fast.model import MultitaskBert
    tok = load_tokenizer(tiny[0], max_length=32)
    model = MultitaskBert.from_pretrained(tiny[0], pooling="mean", pair_order="symmetric", backend="ref")
    ex = examples(11, seed=5)
    data = EncodedTask("sts", ex, tok, "cross", both_orders=True)
    got, given = model_outputs(model, data, batch_size=4, orders=True)
    reversed_ex = [type(e)(i, e.sentence2, e.sentence1, e.label) for i, e in enumerate(ex)]
    model.pair_order = "given"
    a = model_outputs(model, EncodedTask("sts", ex, tok, "cross"), batch_size=3)
    b = model_outputs(model, EncodedTask("sts", reversed_ex, tok, "cross"), batch_size=5)
    model.pair_order = "symmetric"
    np.testing.assert_allclose(given, a, atol=1e-5)
    np.testing.assert_allclose(got, (a + b) / 2, atol=1e-5)
    assert np.abs(a - b).max() > 1e-4  # the orders differ, so the test can fail
    with pytest.raises(ValueError, match="one pair order"):
        model_outputs(model, EncodedTask("sts", ex, tok, "cross"))


def test_pair_swaps_are_random_halves_fixed_by_seed_and_step():
    from smarter_fast.training.steps import pair_swaps
    a = pair_swaps(3, 10, 4000)
    assert a.dtype == bool and 0.45 < a.mean() < 0.55
    np.testing.assert_array_equal(a, pair_swaps(3, 10, 4000))
    assert not np.array_equal(a, pair_swaps(3, 11, 4000))
    assert not np.array_equal(a, pair_swaps(4, 10, 4000))
    # gradient-surgery steps: one independent stream per task, none equal to the plain one
    streams = [pair_swaps(3, 10, 4000, stream=k) for k in range(3)]
    assert all(not np.array_equal(x, y) for x, y in zip([a] + streams, streams))


def test_bad_saved_pair_order_names_the_file(tiny, tmp_path):
    from smarter_fast.model import MultitaskBert
    model = MultitaskBert.from_pretrained(tiny[0], pair_order="symmetric")
    model.save_pretrained(tmp_path / "ck")
    assert MultitaskBert.from_pretrained(tmp_path / "ck").pair_order == "symmetric"
    assert MultitaskBert.from_pretrained(tmp_path / "ck", pair_order="given").pair_order == "given"
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["smarter_fast_pair_order"] = "sorted"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*smarter_fast_pair_order"):
        MultitaskBert.from_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="pair_order"):
        MultitaskBert.from_pretrained(tiny[0], pair_order="sorted")


def test_train_symmetric_with_ema_then_evaluate_cli(tiny, tmp_path, capsys):
    """Training feeds both orders; the checkpoint keeps pair_order; `evaluate` reproduces the run's
    dev metrics from checkpoints/best, which holds the EMA weights; a resume keeps the average."""
    from smarter_fast.evaluate import main as evaluate_main
    from smarter_fast.train import main as train_main
    ckpt, data = tiny
    out = tmp_path / "run"
    base = ["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--batch-size", "4",
            "--eval-batch-size", "5", "--lr", "1e-3", "--max-length", "48", "--num-threads", "1",
            "--split-parts", "1", "--pair-order", "symmetric", "--ema", "0.9", "--seed", "5"]
    assert train_main([*base, "--epochs", "1"]) == 0  # one epoch: it is the best one
    stdout = capsys.readouterr().out
    assert "pair order symmetric" in stdout and "weight EMA decay 0.9" in stdout
    best, last = out / "checkpoints" / "best", out / "checkpoints" / "last"
    assert json.loads((best / "config.json").read_text())["smarter_fast_pair_order"] == "symmetric"
    rows_ = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("raw_mean_score" in r and "quora_acc_given_order" in r for r in rows_)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["ema"]["decay"] == 0.9 and state["ema"]["updates"] == state["global_step"] > 0
    from smarter_fast.model import MultitaskBert
    ema_sd = torch.load(last / "train_state.pt", weights_only=True)["states"]["ema"]
    assert ema_sd["updates"] == state["global_step"]
    ema_w = ema_sd["weights"]  # MultitaskBert state_dict names
    raw_w = MultitaskBert.from_pretrained(last).state_dict()
    assert set(ema_w) == set(raw_w)
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in raw_w)  # the average is not the weights
    best_w = MultitaskBert.from_pretrained(best).state_dict()  # best holds the average
    assert all(torch.equal(best_w[k], ema_w[k]) for k in ema_w)
    run_best = json.loads((out / "dev_metrics.json").read_text())
    ev = tmp_path / "ev"
    assert evaluate_main(["--checkpoint", str(best), "--data-dir", str(data), "--out", str(ev),
                          "--num-threads", "1", "--batch-size", "3"]) == 0
    got = json.loads((ev / "dev_metrics.json").read_text())
    assert got["quora_acc"] == run_best["quora_acc"] and got["sst_acc"] == run_best["sst_acc"]
    assert got["sts_pearson"] == pytest.approx(run_best["sts_pearson"], abs=1e-4)
    # resume for a second epoch: the average continues from the saved one
    assert train_main([*base, "--epochs", "2", "--resume"]) == 0
    state3 = json.loads((last / "trainer_state.json").read_text())
    assert state3["ema"]["updates"] == state3["global_step"] > state["global_step"]


def test_weight_ema_update_rule(tiny):
    from smarter_fast.regularizers.ema import WeightEma
    from smarter_fast.model import MultitaskBert
    model = MultitaskBert.from_pretrained(tiny[0], backend="ref")
    ema = WeightEma(model, 0.99)
    w0 = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    expect = [w.clone() for w in w0]
    for n in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.99, (1 + n) / (10 + n))  # warm-up of the decay
        assert ema.rate() == pytest.approx(d)
        ema.update(model)
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, model.parameters())]
    for e, p in zip(expect, ema.model.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
        assert not p.requires_grad
    with pytest.raises(ValueError, match="decay"):
        WeightEma(model, 1.0)
