"""Exports of a MultitaskBert checkpoint (smarter_fast.model.export): transformers and
sentence-transformers give our outputs to 1e-4 (fp32, eval mode) on text their own tokenizers
encode, what is not exact is refused with the reason, a saved checkpoint is itself a
sentence-transformers directory, and every export carries a model card."""

import json
import shutil
import warnings

import pytest
import torch

from smarter_fast import tasks as registry
from smarter_fast.data.tokenize import encode_pairs, encode_sentences, load_tokenizer
from smarter_fast.model import BertConfig, BertModel, MultitaskBert, save_checkpoint
from smarter_fast.model import export
from smarter_fast.model.checkpoint import default_checkpoint_dir, to_hf_state_dict

transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

TOL = 1e-4
MAX_LENGTH = 24  # the "training run's" --max-length, recorded in trainer_state.json
# an odd batch: lengths from 3 tokens to past MAX_LENGTH, case and accents for the normaliser
FIRST = ["Hello world!", "A gripping, FUNNY film about Zoë's café.", "x",
         "the plot drags on and on and on while the actors look bored, tired and, frankly, lost "
         "somewhere in the third act", "Is it raining in Paris?"]
SECOND = ["Bye.", "A funny film.", "Why would anyone watch this at all, given the reviews it got?",
          "lost", "Does it rain in Paris today?"]
METRICS = {"sst_acc": 0.25, "quora_acc": 0.625, "sts_pearson": 0.1234, "mean_score": 0.4}


def tiny_checkpoint(directory, pooling="cls", pair_features="cross", pair_order="given",
                    trainer_state=True):
    """A random MultitaskBert (hidden 36, 3 heads of 12, the embedded checkpoint's vocabulary)
    with every weight drawn at a scale where a wrong layer shows, saved with save_pretrained."""
    torch.manual_seed(7)
    cfg = BertConfig(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=37, max_position_embeddings=64)
    model = MultitaskBert(BertModel(cfg, backend="ref"), pooling=pooling,
                          pair_features=pair_features, pair_order=pair_order).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.3 * torch.randn_like(p))
    model.save_pretrained(directory, vocab_file=default_checkpoint_dir() / "vocab.txt",
                          max_seq_length=MAX_LENGTH)
    if trainer_state:
        row = {"epoch": 2, **METRICS, "synthetic_data": False}
        (directory / "trainer_state.json").write_text(json.dumps({
            "version": 3, "epochs_done": 2, "next_step_in_epoch": 0, "metrics": [{"epoch": 1}, row],
            "best": {"epoch": 2, "mean_score": 0.4},
            "args": {"max_length": MAX_LENGTH, "pretrained": None, "lr": 1e-5, "pooling": pooling}}))
    return directory, model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(pooling="cls", pair_features="cross", pair_order="given"):
        key = (pooling, pair_features, pair_order)
        if key not in made:
            made[key] = tiny_checkpoint(tmp_path_factory.mktemp("ck"), *key)
        return made[key]
    return get


def batch(ids, type_ids):
    L = max(map(len, ids))
    pad = lambda rows: torch.tensor([r + [0] * (L - len(r)) for r in rows])  # noqa: E731
    return pad(ids), pad([[1] * len(r) for r in ids]), pad(type_ids)


def ours(model, directory, task=None, pairs=False):
    """Our output on FIRST (and SECOND for pairs), tokenized by our tokenizer: the sentence vector
    (task None) or the task's head output."""
    tok = load_tokenizer(directory, max_length=MAX_LENGTH)
    ids, mask, tt = batch(*(encode_pairs(tok, FIRST, SECOND) if pairs else encode_sentences(tok, FIRST)))
    with torch.no_grad():
        if task is None:
            return model.pool(model.bert(ids, mask, tt), mask), (ids, tt)
        return model(task.head, ids, mask, tt), (ids, tt)


def st_encode(directory):
    model = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
    return model, torch.from_numpy(model.encode(FIRST, batch_size=2))


# ---- transformers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("t", registry.TASKS, ids=registry.TASK_NAMES)
def test_transformers_export_gives_our_outputs_and_our_tokens(checkpoints, tmp_path, t):
    directory, model = checkpoints("cls")
    result = export.export_transformers(directory, tmp_path / "out")
    assert result.refused == {} and set(result.written) == set(registry.TASK_NAMES)
    path = result.written[t.name]
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    assert hf.config.num_labels == t.num_outputs
    assert [hf.config.id2label[i] for i in range(t.num_outputs)] == list(t.output_names)
    assert hf.config.problem_type == export.PROBLEM_TYPES[t.kind]
    texts = (FIRST, SECOND) if t.is_pair else (FIRST,)
    enc = tok(*texts, padding=True, truncation=True, return_tensors="pt")
    expect, (ids, tt) = ours(model, directory, t, pairs=t.is_pair)
    # the Hugging Face tokenizer gives our ids and, for a pair, our token types 0 / 1
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["token_type_ids"], tt)
    assert enc["input_ids"].shape[1] == MAX_LENGTH  # the long example is truncated as in training
    with torch.no_grad():
        logits = hf(**enc).logits
    assert logits.shape == (len(FIRST), t.num_outputs)
    assert (logits.reshape(expect.shape) - expect).abs().max().item() <= TOL
    assert expect.abs().max().item() > 0.1  # outputs that a wrong layer would change visibly


def test_transformers_export_of_mean_pooling_refuses_every_task_and_writes_the_encoder(
        checkpoints, tmp_path):
    directory, model = checkpoints("mean")
    result = export.export_transformers(directory, tmp_path / "out")
    assert set(result.refused) == set(registry.TASK_NAMES)
    assert all("pooling is 'mean'" in why for why in result.refused.values())
    assert set(result.written) == {export.ENCODER_DIR}
    path = result.written[export.ENCODER_DIR]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [export.ENCODER_DIR]
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    hf = transformers.AutoModel.from_pretrained(str(path)).eval()
    enc = tok(FIRST, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    expect, _ = ours(model, directory)
    assert ((h * mask).sum(1) / mask.sum(1) - expect).abs().max().item() <= TOL
    card = (path / "README.md").read_text()
    assert "pooling is 'mean'" in card and "AutoModel.from_pretrained" in card


@pytest.mark.parametrize("options, reason", [
    (("cls", "bi", "given"), "pair_features is 'bi'"),
    (("cls", "both", "given"), "pair_features is 'both'"),
    (("cls", "cross", "symmetric"), "pair_order is 'symmetric': our prediction is the mean over both"),
], ids=["bi", "both", "symmetric"])
def test_transformers_export_refuses_the_pair_heads_it_cannot_compute(checkpoints, tmp_path,
                                                                       options, reason):
    directory, model = checkpoints(*options)
    result = export.export_transformers(directory, tmp_path / "out")
    pair_tasks = {t.name for t in registry.TASKS if t.is_pair}
    assert set(result.refused) == pair_tasks and all(reason in w for w in result.refused.values())
    # the single-sentence head reads the pooled [CLS] vector whatever the pair options: exact
    assert set(result.written) == {registry.SST.name, export.ENCODER_DIR}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(result.written[registry.SST.name])).eval()
    expect, (ids, tt) = ours(model, directory, registry.SST)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=(ids != 0).long(), token_type_ids=tt).logits
    assert (logits - expect).abs().max().item() <= TOL


# ---- sentence-transformers ----------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_transformers_export_encodes_our_sentence_vector(checkpoints, tmp_path, pooling):
    directory, model = checkpoints(pooling)
    out = export.export_sentence_transformers(directory, tmp_path / "st").out
    st, got = st_encode(out)
    assert st.max_seq_length == MAX_LENGTH
    expect, _ = ours(model, directory)
    assert got.shape == expect.shape and (got - expect).abs().max().item() <= TOL
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == (
        ["Transformer", "Pooling", "Dense"] if pooling == "cls" else ["Transformer", "Pooling"])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_sentence_transformers_export_with_the_sst_head_encodes_its_logits(checkpoints, tmp_path,
                                                                          pooling):
    directory, model = checkpoints(pooling, "bi", "symmetric")  # pair options do not matter here
    out = export.export_sentence_transformers(directory, tmp_path / "st", with_head="sst").out
    _, got = st_encode(out)
    expect, _ = ours(model, directory, registry.SST)
    assert got.shape == (len(FIRST), registry.SST.num_outputs)
    assert (got - expect).abs().max().item() <= TOL
    card = (out / "README.md").read_text()
    assert "SST logits" in card and "very negative" in card


@pytest.mark.parametrize("task", [t.name for t in registry.TASKS if t.is_pair])
def test_sentence_transformers_export_refuses_a_pair_head(checkpoints, tmp_path, task):
    directory, _ = checkpoints("cls")
    with pytest.raises(export.ExportError, match="reads a sentence pair.*encode takes one text"):
        export.export_sentence_transformers(directory, tmp_path / "st", with_head=task)
    assert not (tmp_path / "st").exists()


# ---- the checkpoint itself -------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_saved_checkpoint_loads_in_sentence_transformers_with_its_pooling(checkpoints, pooling):
    directory, model = checkpoints(pooling)
    st, got = st_encode(directory)
    assert st.max_seq_length == MAX_LENGTH
    pool_config = json.loads((directory / "1_Pooling" / "config.json").read_text())
    assert pool_config["pooling_mode_cls_token"] == (pooling == "cls")
    assert pool_config["pooling_mode_mean_tokens"] == (pooling == "mean")
    expect, _ = ours(model, directory)
    assert (got - expect).abs().max().item() <= TOL


def test_the_sentence_transformers_files_change_nothing_our_loaders_read(checkpoints):
    directory, model = checkpoints("cls")
    from safetensors import safe_open
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(to_hf_state_dict(model.state_dict()))
    config = json.loads((directory / "config.json").read_text())
    assert set(config) == set(model.config.to_dict()) | set(model.checkpoint_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unexpected found
        again = MultitaskBert.from_pretrained(directory, backend="ref")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_base_models_sentence_transformers_files_are_replaced_not_kept(tmp_path):
    """A base directory with all-MiniLM's modules (mean pooling, then Normalize) and max length
    256: a model fine-tuned from it, saved into a new directory or over the base, describes what
    it trained with (cls pooling, no Normalize, its own length)."""
    base, _ = tiny_checkpoint(tmp_path / "base", "mean", trainer_state=False)
    embedded = default_checkpoint_dir()
    for name in ("modules.json", "sentence_bert_config.json"):
        shutil.copyfile(embedded / name, base / name)
    model = MultitaskBert.from_pretrained(base, pooling="cls", backend="ref")
    for target in (tmp_path / "tuned", base):
        model.save_pretrained(target, max_seq_length=40)
        modules = json.loads((target / "modules.json").read_text())
        assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense"]
        assert json.loads((target / "sentence_bert_config.json").read_text())["max_seq_length"] == 40
        assert json.loads((target / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"]


# ---- refusals and model cards ----------------------------------------------------------------------
def test_directories_that_are_not_checkpoints_with_heads_are_refused(tmp_path, checkpoints):
    with pytest.raises(export.ExportError, match="not a directory"):
        export.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(export.ExportError, match="not a directory"):
        export.load_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(export.ExportError, match="no model.safetensors"):
        export.load_checkpoint(tmp_path / "empty")
    plain = tmp_path / "plain"  # a BERT directory: an encoder, no task heads
    cfg = BertConfig(vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8)
    save_checkpoint(BertModel(cfg), plain, cfg)
    with pytest.raises(export.ExportError, match="not a MultitaskBert checkpoint with task heads"):
        export.load_checkpoint(plain)
    directory, _ = checkpoints("cls")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "old.txt").write_text("x")
    with pytest.raises(export.ExportError, match="exists and is not an empty directory"):
        export.export_transformers(directory, tmp_path / "taken")
    assert (tmp_path / "taken" / "old.txt").is_file()


def test_every_exported_directory_has_a_factual_model_card(checkpoints, tmp_path):
    directory, _ = checkpoints("cls")
    written = dict(export.export_transformers(directory, tmp_path / "tf").written)
    written["st"] = export.export_sentence_transformers(directory, tmp_path / "st").out
    for name, path in written.items():
        card = (path / "README.md").read_text()
        assert "trainer_state.json, the dev evaluation after epoch 2" in card
        assert "| 0.2500 | 0.6250 | 0.1234 | 0.4000 |" in card  # METRICS, as recorded
        assert '"max_length": 24' in card and "all-MiniLM-L6-v2 (the embedded default" in card
        assert "pooling: cls; pair features: cross; pair order: given" in card
        assert str(path) in card  # the loading snippet points at this directory
    for t in registry.TASKS:
        card = (written[t.name] / "README.md").read_text()
        assert f"| {t.name} ({t.title}) | {t.head} |" in card and ", ".join(
            f"{i}: {n}" for i, n in enumerate(t.output_names)) in card
        assert "AutoModelForSequenceClassification.from_pretrained" in card
    assert "SentenceTransformer(" in (written["st"] / "README.md").read_text()


def test_a_card_without_training_records_says_so(tmp_path):
    directory, _ = tiny_checkpoint(tmp_path / "ck", trainer_state=False)
    card = (export.export_sentence_transformers(directory, tmp_path / "st").out / "README.md").read_text()
    assert "None recorded beside the checkpoint" in card and "Not recorded (no trainer_state.json" in card
    assert "base checkpoint: not recorded" in card


def test_dev_metrics_follow_the_weights_the_directory_holds(tmp_path):
    """With --ema, a row scores the average (checkpoints/best) and raw_* the trained weights
    (checkpoints/last); a mid-epoch save has no row; evaluate's dev_metrics.json comes first."""
    row = {"epoch": 1, **METRICS, **{f"raw_{k}": v / 2 for k, v in METRICS.items()}}
    state = {"epochs_done": 1, "next_step_in_epoch": 0, "metrics": [row], "ema": {"decay": 0.9}}
    for name in ("best", "last", "copy"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(state))
    assert export.dev_metrics(tmp_path / "best")[0] == METRICS
    assert export.dev_metrics(tmp_path / "last")[0] == {k: v / 2 for k, v in METRICS.items()}
    assert export.dev_metrics(tmp_path / "copy") is None
    (tmp_path / "last" / "trainer_state.json").write_text(json.dumps({**state, "next_step_in_epoch": 3}))
    assert export.dev_metrics(tmp_path / "last") is None
    (tmp_path / "last" / "dev_metrics.json").write_text(json.dumps({"sst_acc": 0.5, "sst_confusion": []}))
    assert export.dev_metrics(tmp_path / "last") == ({"sst_acc": 0.5}, "dev_metrics.json in the "
                                                     "checkpoint (python -m smarter_fast.evaluate)")


def test_the_embedded_checkpoint_fine_tuned_exports_exactly(tmp_path):
    """The realistic case: all-MiniLM-L6-v2 (whose own modules are mean pooling + Normalize, and
    whose tokenizer.json the checkpoint copies) with cls pooling and fresh heads, saved and then
    loaded by sentence-transformers and exported for transformers."""
    model = MultitaskBert.from_pretrained(backend="ref")  # the embedded default; heads initialised
    directory = model.save_pretrained(tmp_path / "ck", max_seq_length=MAX_LENGTH)
    assert (directory / "tokenizer.json").is_file() and not (directory / "2_Normalize").exists()
    _, got = st_encode(directory)
    expect, _ = ours(model, directory)
    assert (got - expect).abs().max().item() <= TOL
    result = export.export_transformers(directory, tmp_path / "out")
    quora = registry.QUORA
    tok = transformers.AutoTokenizer.from_pretrained(str(result.written[quora.name]))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(result.written[quora.name])).eval()
    enc = tok(FIRST, SECOND, padding=True, truncation=True, return_tensors="pt")
    expect, (ids, tt) = ours(model, directory, quora, pairs=True)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["token_type_ids"], tt)
    with torch.no_grad():
        assert (hf(**enc).logits[:, 0] - expect).abs().max().item() <= TOL
