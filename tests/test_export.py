"""`python -m smarter_fast.export`: a checkpoint written by training exported for transformers and
sentence-transformers from the command line, what it prints, and its errors (exit code 2)."""

import json

import pytest
import torch

from smarter_fast import tasks as registry
from smarter_fast.export import main

transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

SIZES = {t.name: {"train": 16, "dev": 8, "test-student": 0} for t in registry.TASKS}
MAX_LENGTH = 40


@pytest.fixture(scope="module")
def trained(make_tiny_run, tmp_path_factory):
    """checkpoints/best of a one-epoch run on a tiny random BERT (a character vocabulary, no
    tokenizer_config.json) and SYNTHETIC data."""
    from smarter_fast.train import main as train
    ckpt, data = make_tiny_run(SIZES, "tiny_export")
    out = tmp_path_factory.mktemp("run")
    assert train(["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(out), "--epochs", "1",
                  "--batch-size", "4", "--eval-batch-size", "8", "--lr", "1e-3", "--seed", "3",
                  "--max-length", str(MAX_LENGTH), "--num-threads", "1", "--split-parts", "1",
                  "--backend", "ref"]) == 0
    return out / "checkpoints" / "best"


def ours(directory, texts, task=None):
    from smarter_fast.data.tokenize import encode_sentences, load_tokenizer
    from smarter_fast.model import MultitaskBert
    model = MultitaskBert.from_pretrained(directory, backend="ref")
    ids, _ = encode_sentences(load_tokenizer(directory, max_length=MAX_LENGTH), texts)
    L = max(map(len, ids))
    x = torch.tensor([r + [0] * (L - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in ids])
    with torch.no_grad():
        return model(task.head, x, mask) if task else model.pool(model.bert(x, mask), mask)


TEXTS = ["a good film.", "Not worth it at all, honestly; the longest of them all by far, and dull", "ok"]


def test_transformers_export_from_the_command_line(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main([str(trained), "--to", "transformers", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {t.name}: {out / t.name}" for t in registry.TASKS]
    path = out / registry.SST.name
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        logits = hf(**tok(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits
    assert (logits - ours(trained, TEXTS, registry.SST)).abs().max().item() <= 1e-4
    card = (path / "README.md").read_text()
    assert "From trainer_state.json, the dev evaluation after epoch 1:" in card
    assert f'"max_length": {MAX_LENGTH}' in card


def test_sentence_transformers_export_from_the_command_line(trained, tmp_path, capsys):
    for extra, task in (([], None), (["--with-head", registry.SST.name], registry.SST)):
        out = tmp_path / f"st{len(extra)}"
        assert main([str(trained), "--to", "sentence-transformers", str(out), *extra]) == 0
        assert capsys.readouterr().out == f"wrote sentence-transformers: {out}\n"
        st = sentence_transformers.SentenceTransformer(str(out), device="cpu")
        assert st.max_seq_length == MAX_LENGTH
        got = torch.from_numpy(st.encode(TEXTS))
        assert (got - ours(trained, TEXTS, task)).abs().max().item() <= 1e-4


def test_the_trained_checkpoint_itself_loads_in_sentence_transformers(trained):
    st = sentence_transformers.SentenceTransformer(str(trained), device="cpu")
    assert st.max_seq_length == MAX_LENGTH
    assert (torch.from_numpy(st.encode(TEXTS)) - ours(trained, TEXTS)).abs().max().item() <= 1e-4


def test_refusals_and_errors_exit_2_with_the_reason(trained, tmp_path, capsys):
    for task in (t.name for t in registry.TASKS if t.is_pair):
        assert main([str(trained), "--to", "sentence-transformers", str(tmp_path / task),
                     "--with-head", task]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --with-head {task}: the ") and "encode takes one text" in err
    assert main([str(tmp_path / "nowhere"), "--to", "transformers", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main([str(tmp_path / "plain"), "--to", "transformers", str(tmp_path / "o")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: usage errors
        main([str(trained), "--to", "transformers", str(tmp_path / "o"), "--with-head", "sst"])
    assert e.value.code == 2 and "--with-head goes with --to sentence-transformers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_refused_task_is_printed_and_the_rest_exported(trained, tmp_path, capsys):
    """A symmetric-order checkpoint: SST and the encoder are written, the pair tasks named."""
    from smarter_fast.model import MultitaskBert
    sym = tmp_path / "sym"
    MultitaskBert.from_pretrained(trained, pair_order="symmetric", backend="ref").save_pretrained(sym)
    assert main([str(sym), "--to", "transformers", str(tmp_path / "hf")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"wrote sst: {tmp_path / 'hf' / 'sst'}", f"wrote encoder: {tmp_path / 'hf' / 'encoder'}"]
    assert [line.split(":")[0] for line in lines[2:]] == ["not exported"] * 2
    assert all("pair_order is 'symmetric'" in line for line in lines[2:])
