"""load_tokenizer against transformers' BERT tokenizer built from the same vocab.txt."""

import inspect
import json
import shutil
from pathlib import Path

import pytest

from smarter_fast.data import load_cs224n, load_tokenizer
from smarter_fast.data.tokenize import _default_checkpoint_dir, encode_pairs, encode_sentences

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).parents[2].parent / "shared/data/cs224n"
MAX_LEN = 128

TRICKY = [
    "Héllo wörld, naïve café — résumé!",
    "Ångström Øre ÉCOLE Straße ﬁne",
    "中文字符和English混合 日本語のテキスト 한국어",
    "Don't stop!!! ... (really?) [brackets] {braces} $100 50% #tag @user a/b c\\d",
    "``quoted'' -- `ticks' ... co-writer\\/director",
    "",
    "   ",
    "\t\n \u200b\u00ad",
    "a",
    "[CLS] [SEP] [PAD] [MASK] [UNK] inside text [sep]",
    "emoji 🙂👍🏽 and control\x00\x07 chars",
    "x" * 150 + " supercalifragilisticexpialidocious",
    "unaffable antidisestablishmentarianism pneumonoultramicroscopic",
    " ".join(["longtext"] * 300),
    " ".join(f"word{i}" for i in range(400)),
]


def hf_tokenizer(vocab: Path, lowercase: bool = True):
    """transformers' fast BERT tokenizer from vocab.txt (v5 takes vocab=path, v4 vocab_file=path)."""
    cls = transformers.BertTokenizerFast
    params = inspect.signature(cls.__init__).parameters
    key = "vocab" if "vocab" in params and "vocab_file" not in params else "vocab_file"
    return cls(**{key: str(vocab)}, do_lower_case=lowercase)


@pytest.fixture(scope="module")
def vocab():
    return _default_checkpoint_dir() / "vocab.txt"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(max_length=MAX_LEN)


@pytest.fixture(scope="module", params=["fast", "python"])
def hf(request, vocab):
    """Oracles: transformers' fast tokenizer, and its pure-Python one where this version has it."""
    if request.param == "fast":
        return hf_tokenizer(vocab)
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as slow
    except ImportError:
        slow = getattr(transformers, "BertTokenizer", None)
        if slow is None or "vocab_file" not in inspect.signature(slow.__init__).parameters:
            pytest.skip("this transformers version has no pure-Python BERT tokenizer")
    return slow(vocab_file=str(vocab), do_lower_case=True)


def assert_same(tok, hf, first, second=None):
    firsts = list(first)
    seconds = list(second) if second is not None else None
    if seconds is None:
        ids, type_ids = encode_sentences(tok, firsts)
        want = hf(firsts, truncation=True, max_length=MAX_LEN, return_token_type_ids=True)
    else:
        ids, type_ids = encode_pairs(tok, firsts, seconds)
        want = hf(firsts, seconds, truncation=True, max_length=MAX_LEN, return_token_type_ids=True)
    for i in range(len(firsts)):
        where = repr(firsts[i]) + ("" if seconds is None else f" / {seconds[i]!r}")
        assert ids[i] == want["input_ids"][i], where
        assert type_ids[i] == want["token_type_ids"][i], where


def test_tricky_sentences(tok, hf):
    assert_same(tok, hf, TRICKY)


def test_tricky_pairs(tok, hf):
    assert_same(tok, hf, TRICKY, list(reversed(TRICKY)))


def test_truncation_and_template(tok):
    enc = tok.encode(" ".join(["longtext"] * 300))
    assert len(enc.ids) == MAX_LEN
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    pair = tok.encode("short one", " ".join(["longtext"] * 300))
    assert len(pair.ids) == MAX_LEN
    # longest_first: the short first sentence survives whole, the long second one is cut.
    assert pair.tokens[:4] == ["[CLS]", "short", "one", "[SEP]"] and pair.tokens[-1] == "[SEP]"
    assert pair.type_ids == [0] * 4 + [1] * (MAX_LEN - 4)
    assert len(load_tokenizer(max_length=16).encode(" ".join(["w"] * 50)).ids) == 16


def test_decode(tok):
    assert tok.decode(tok.encode("Unaffable playing, Café!").ids) == "unaffable playing, cafe!"


def test_batch_helpers_match_encode(tok):
    s1, s2 = ["a first one", "Another, longer sentence here."], ["b", "and its partner"]
    ids, type_ids = encode_pairs(tok, s1, s2)
    for i in range(2):
        assert ids[i] == tok.encode(s1[i], s2[i]).ids and type_ids[i] == tok.encode(s1[i], s2[i]).type_ids
    ids, type_ids = encode_sentences(tok, s1)
    assert ids[1] == tok.encode(s1[1]).ids and set(type_ids[1]) == {0}
    with pytest.raises(ValueError, match="2 first sentences but 1"):
        encode_pairs(tok, s1, s2[:1])


def test_missing_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_tokenizer(tmp_path)


def test_case_from_config_and_argument(tmp_path, vocab):
    shutil.copy(vocab, tmp_path / "vocab.txt")  # the checkpoint's vocabulary, not CS224N data
    text = ["Hello Wörld", "Paris IS nice"]
    cased_hf = hf_tokenizer(vocab, lowercase=False)
    # No tokenizer_config.json: lowercase by default.
    assert encode_sentences(load_tokenizer(tmp_path), text)[0] == hf_tokenizer(vocab)(text)["input_ids"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert encode_sentences(load_tokenizer(tmp_path), text)[0] == cased_hf(text)["input_ids"]
    assert encode_sentences(load_tokenizer(tmp_path, lowercase=True), text)[0] == hf_tokenizer(vocab)(text)["input_ids"]


@pytest.fixture(scope="module")
def real():
    if not DATA.is_dir():
        pytest.skip(f"real CS224N data not found at {DATA}")
    return load_cs224n(DATA, "train")


def spread(examples, n=300):
    """About n examples spread over the file, plus the longest ones (they exercise truncation)."""
    step = max(1, len(examples) // n)
    longest = sorted(examples, key=lambda e: -len(getattr(e, "sentence", None) or e.sentence1 + e.sentence2))[:10]
    return examples[::step][:n] + longest


@pytest.mark.real_data
def test_real_sst(tok, hf, real):
    assert_same(tok, hf, [e.sentence for e in spread(real.sst)])


@pytest.mark.real_data
@pytest.mark.parametrize("task", ["quora", "sts"])
def test_real_pairs(tok, hf, real, task):
    examples = spread(getattr(real, task))
    assert_same(tok, hf, [e.sentence1 for e in examples], [e.sentence2 for e in examples])
