"""smarter_fast.load and its Predictor: the outputs evaluate scores, row by row; embeddings; an
ensemble; the refusals."""

import logging

import numpy as np
import pytest
import torch

import smarter_fast
from smarter_fast import tasks as registry
from smarter_fast.data.cs224n import read_task_file
from smarter_fast.evaluate import main as evaluate_main
from smarter_fast.evaluation import read_predictions
from smarter_fast.inference import Paraphrase, Sentiment, Similarity, load

SIZES = {"sst": {"train": 3, "dev": 23, "test-student": 7},
         "quora": {"train": 3, "dev": 19, "test-student": 6},
         "sts": {"train": 3, "dev": 17, "test-student": 5}}

# (pooling, pair_features, pair_order): the plain layout, and the ones whose pairs need more
# than one forward per example
LAYOUTS = [("cls", "cross", "given"), ("mean", "bi", "symmetric"), ("cls", "both", "symmetric")]


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, name="tiny_inference")


@pytest.fixture(scope="module")
def trained_like(tiny, make_head_checkpoint):
    """(pooling, pair_features, pair_order, seed=0) -> a checkpoint over the tiny encoder."""
    return lambda *layout, seed=0: make_head_checkpoint(tiny[0], *layout, seed=seed)


def dev_inputs(data_dir, t):
    examples, _ = read_task_file(data_dir / t.file_name("dev"), t.name)
    inputs = [(e.sentence1, e.sentence2) if t.is_pair else e.sentence for e in examples]
    return [e.id for e in examples], inputs


def check_against_evaluate(predictor, data_dir, out_dir, checkpoints):
    assert evaluate_main(["--checkpoint", *map(str, checkpoints), "--data-dir", str(data_dir),
                          "--out", str(out_dir), "--device", "cpu"]) == 0
    for t in registry.TASKS:
        ids, inputs = dev_inputs(data_dir, t)
        written = read_predictions(out_dir / "predictions" / t.prediction_file("dev"))
        assert list(written) == ids
        results = predictor.predict(t.name, inputs)
        raw = predictor.outputs(t.name, inputs)
        assert len(results) == len(ids) > 0
        if t.kind == "regression":
            scores = np.array([r.score for r in results])
            np.testing.assert_allclose(scores, [float(written[i]) for i in ids], atol=1e-4)
            assert scores.std() > 1e-3  # rows differ: the comparison can fail
            continue
        assert [r.label for r in results] == [int(written[i]) for i in ids]  # identical labels
        assert raw.std(axis=0).max() > 1e-3  # rows differ: the comparison can fail
        if t.kind == "classification":
            e = np.exp(raw - raw.max(axis=1, keepdims=True))
            np.testing.assert_allclose([r.probabilities for r in results],
                                       e / e.sum(axis=1, keepdims=True), atol=1e-4)
        else:
            np.testing.assert_allclose([r.probability for r in results], 1 / (1 + np.exp(-raw)), atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["-".join(x) for x in LAYOUTS])
def test_predictions_are_what_evaluate_scores_row_by_row(tiny, trained_like, tmp_path, layout):
    _, data_dir = tiny
    ckpt = trained_like(*layout)
    predictor = load(ckpt, device="cpu")
    assert (predictor.pair_features, predictor.pair_order) == layout[1:] and predictor.trained
    check_against_evaluate(predictor, data_dir, tmp_path, [ckpt])


def test_an_ensemble_averages_its_members_raw_outputs(tiny, trained_like, tmp_path):
    _, data_dir = tiny
    cks = [trained_like("cls", "cross", "symmetric", seed=s) for s in (1, 2)]
    ensemble = load(cks, device="cpu")
    check_against_evaluate(ensemble, data_dir, tmp_path, cks)
    _, pairs = dev_inputs(data_dir, registry.STS)
    members = [load(c, device="cpu").outputs(registry.STS.name, pairs) for c in cks]
    np.testing.assert_allclose(ensemble.outputs(registry.STS.name, pairs), np.mean(members, axis=0),
                               atol=1e-5)
    assert np.abs(members[0] - members[1]).max() > 1e-2
    with pytest.raises(ValueError, match="ensemble"):
        ensemble.embed(["a b"])


def test_result_types_and_label_names(trained_like):
    p = load(trained_like("cls", "cross", "given"), device="cpu")
    s, = p.predict_sentiment(["a good film"])
    assert isinstance(s, Sentiment) and s.label_name == registry.SST.label_names[s.label]
    assert len(s.probabilities) == 5 and abs(sum(s.probabilities) - 1) < 1e-6
    assert s.label == int(np.argmax(s.probabilities))
    q, = p.predict_paraphrase([("a cat", "the cat")])
    assert isinstance(q, Paraphrase) and q.label == int(q.probability > 0.5)
    assert q.label_name == registry.QUORA.label_names[q.label]
    r, = p.predict_similarity([("a cat", "the cat")])
    assert isinstance(r, Similarity) and isinstance(r.score, float)
    assert p.predict_sentiment([]) == [] and p.embed([]).shape == (0, 32)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embed_is_the_pooled_vector_the_heads_see(trained_like, pooling):
    p = load(trained_like(pooling, "cross", "given"), device="cpu")
    texts = ["a b c d e f g", "hi", "the cat sat on the mat, twice"]
    got = p.embed(texts)
    assert got.shape == (3, 32) and got.dtype == np.float32
    model = p.model
    for text, row in zip(texts, got):  # one at a time: no padding, the encoder's own outputs
        ids = torch.tensor([p.tokenizer.encode(text).ids])
        with torch.no_grad():
            out = model.bert(ids, torch.ones_like(ids))
        want = out["pooler_output"][0] if pooling == "cls" else out["last_hidden_state"][0].mean(0)
        np.testing.assert_allclose(row, want.numpy(), atol=1e-5)
        with torch.no_grad():  # and it is what the sentiment head reads
            head = model.sentiment(torch.from_numpy(row)[None])
        np.testing.assert_allclose(head[0].numpy(), p.outputs(registry.SST.name, [text])[0], atol=1e-5)


def test_bf16_runs_close_to_fp32(trained_like):
    ckpt = trained_like("cls", "cross", "given")
    texts = ["a b c", "the dog", "x y z w"]
    fp32 = load(ckpt, device="cpu").outputs(registry.SST.name, texts)
    p = load(ckpt, device="cpu", precision="bf16")
    assert p.precision == "bf16"
    bf16 = p.outputs(registry.SST.name, texts)
    assert not np.array_equal(bf16, fp32)  # autocast did run
    np.testing.assert_allclose(bf16, fp32, atol=0.1 * np.abs(fp32).max())


def test_no_checkpoint_or_no_heads_is_said(tiny, caplog):
    ckpt, _ = tiny  # a plain BERT directory: no task heads
    with caplog.at_level(logging.WARNING, logger="smarter_fast"):
        p = load(ckpt, device="cpu")
    assert not p.trained and "no trained task heads" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smarter_fast"):
        default = smarter_fast.load(device="cpu")
    assert not default.trained and "no trained task heads" in caplog.text
    assert default.embed(["a sentence"]).shape == (1, 384)


def test_bad_inputs_are_refused_clearly(tiny, tmp_path):
    ckpt, _ = tiny
    p = load(ckpt, device="cpu")
    with pytest.raises(TypeError, match="one string"):
        p.predict_sentiment("a film")
    with pytest.raises(TypeError, match="one pair"):
        p.predict_paraphrase(("a", "b"))
    with pytest.raises(TypeError, match="pair 1"):
        p.predict_similarity([("a", "b"), ("c",)])
    with pytest.raises(TypeError, match="sentence 0"):
        p.embed([3])
    with pytest.raises(FileNotFoundError, match="not found"):
        load(tmp_path / "absent")
    with pytest.raises(ValueError, match="max_length"):
        load(ckpt, max_length=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: cuda is not refused here")
def test_cuda_without_a_gpu_is_refused(tiny):
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        load(tiny[0], device="cuda")


def test_the_package_exports_the_api_without_importing_torch_first():
    import subprocess
    import sys
    code = ("import sys, smarter_fast; assert 'torch' not in sys.modules; "
            "assert callable(smarter_fast.load); print(smarter_fast.Sentiment.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Sentiment"


@pytest.mark.parametrize("native", [True, False])
def test_precision_defaults_to_the_training_runs(trained_like, tmp_path, monkeypatch, native):
    import json
    import shutil

    from smarter_fast import precision
    from smarter_fast.inference import choose_precision
    monkeypatch.setattr(precision, "native_bf16", lambda device: (native, "a reason: the CPU lacks it"))
    ckpt = tmp_path / "ck"
    shutil.copytree(trained_like("cls", "cross", "given"), ckpt)
    cpu = torch.device("cpu")
    assert choose_precision(None, [ckpt], cpu) == ("fp32", None)  # no trainer_state.json
    (ckpt / "trainer_state.json").write_text(json.dumps({"args": {"precision": "bf16"}}))
    chosen, message = choose_precision(None, [ckpt], cpu)
    assert chosen == ("bf16" if native else "fp32")
    assert ("as the checkpoint was trained" in message) if native else message.startswith("warning:")
    assert choose_precision("fp32", [ckpt], cpu) == ("fp32", None)  # an explicit choice wins
    assert load(ckpt, device="cpu").precision == chosen
