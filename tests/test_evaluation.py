"""Metrics against numpy, prediction file format, batched inference order, the evaluate CLI."""

import numpy as np
import pytest
import torch

from smarter_fast.evaluation import (EncodedTask, accuracy, combine, compute_metrics, confusion_matrix,
                                   macro_f1, model_outputs, pearson, predictions_from_outputs,
                                   read_predictions, write_predictions)


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    pred[:100] = gold[:100]
    assert accuracy(pred, gold) == pytest.approx(np.mean(pred == gold))
    m = confusion_matrix(pred, gold)
    for i in range(5):
        for j in range(5):
            assert m[i, j] == np.sum((gold == i) & (pred == j))
    f1s = []
    for c in range(5):
        tp = np.sum((pred == c) & (gold == c))
        p = tp / max(np.sum(pred == c), 1)
        r = tp / max(np.sum(gold == c), 1)
        f1s.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    assert macro_f1(pred, gold) == pytest.approx(np.mean(f1s))
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = y + x
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson(np.ones(5), np.arange(5)) == 0.0  # undefined -> 0


def test_macro_f1_absent_class_counts_zero():
    gold = np.array([0, 0, 1, 1])
    assert macro_f1(gold, gold) == pytest.approx(2 / 5)  # classes 2-4 neither gold nor predicted


def test_combined_scores():
    m = combine(0.5, 0.8, 0.6)
    assert m["mean_score"] == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    assert m["cs224n_score"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    full = compute_metrics({"sst": np.array([1, 2]), "quora": np.array([1, 0]), "sts": np.array([1.0, 2.0])},
                           {"sst": np.array([1, 3]), "quora": np.array([1, 1]), "sts": np.array([0.0, 5.0])})
    assert full["sst_acc"] == 0.5 and full["quora_acc"] == 0.5 and full["sts_pearson"] == pytest.approx(1.0)
    assert np.array(full["sst_confusion"]).sum() == 2


def test_predictions_from_outputs():
    assert predictions_from_outputs("sst", np.array([[0, 1, 5, 0, 0], [9, 0, 0, 0, 0]])).tolist() == [2, 0]
    assert predictions_from_outputs("quora", np.array([-0.1, 0.3])).tolist() == [0, 1]
    assert predictions_from_outputs("sts", np.array([1.5, 4.25])).tolist() == [1.5, 4.25]


@pytest.mark.parametrize("task,header,values,shown", [
    ("sst", "Predicted_Sentiment", [3, 0], ["3", "0"]),
    ("quora", "Predicted_Is_Paraphrase", [1, 0], ["1", "0"]),
    ("sts", "Predicted_Similiary", [2.5, 4.125], ["2.5000", "4.1250"]),
])
def test_prediction_file_format(tmp_path, task, header, values, shown):
    path = write_predictions(tmp_path, task, "dev", ["abc", "def"], values)
    prefix = {"sst": "sst", "quora": "para", "sts": "sts"}[task]
    assert path.name == f"{prefix}-dev-output.csv"
    lines = path.read_text().splitlines()
    assert lines[0].split("\t")[0].strip() == "id" and lines[0].split("\t")[1].strip() == header
    assert [ln.split(" , ") for ln in lines[1:]] == [["abc", shown[0] + " "], ["def", shown[1] + " "]]
    assert read_predictions(path) == {"abc": shown[0], "def": shown[1]}
    assert write_predictions(tmp_path, task, "test-student", ["x"], values[:1]).name == f"{prefix}-test-output.csv"


class _Example:
    def __init__(self, i, s1, s2, label):
        self.id, self.sentence1, self.sentence2, self.label, self.sentence = f"id{i}", s1, s2, label, s1


def test_batched_outputs_keep_example_order():
    from smarter_fast.data import load_tokenizer
    from smarter_fast.model import BertConfig, BertModel, MultitaskBert
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = MultitaskBert(BertModel(cfg, backend="ref"))
    tok = load_tokenizer(max_length=64)
    words = "the a cat dog sat on mat big small red".split()
    rng = np.random.default_rng(1)
    ex = [_Example(i, " ".join(rng.choice(words, rng.integers(1, 12))), " ".join(rng.choice(words, 3)), 1.0)
          for i in range(23)]
    data = EncodedTask("sts", ex, tok)
    batched = model_outputs(model, data, batch_size=4)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        single = [model.predict_similarity(**{k: v for k, v in data.batch([i]).items() if k != "labels"}).item()
                  for i in range(len(ex))]
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("length", ["0", "3", "600", "-1"])
def test_evaluate_rejects_a_max_length_outside_8_to_512(tmp_path, capsys, length):
    from smarter_fast.evaluate import main as evaluate_main
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(tmp_path), "--data-dir", str(tmp_path), "--max-length", length])
    assert e.value.code == 2
    assert "--max-length must be in [8, 512]" in capsys.readouterr().err
