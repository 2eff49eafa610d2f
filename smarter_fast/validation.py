"""Up-front checks of user inputs that argparse types cannot express (one clear line each)."""

from __future__ import annotations

from pathlib import Path

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_pretrained_dir(path) -> str | None:
    """None when `path` looks like a loadable BERT directory, else a one-line message."""
    d = Path(path)
    expected = "a Hugging Face BERT directory with config.json, model.safetensors (or pytorch_model.bin) and vocab.txt"
    if not d.is_dir():
        return f"--pretrained {path}: directory not found (expected {expected})"
    missing = [f for f in ("config.json", "vocab.txt") if not (d / f).is_file()]
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        missing.append("model.safetensors or pytorch_model.bin")
    if missing:
        return f"--pretrained {path}: lacks {', '.join(missing)} (expected {expected})"
    from .model.checkpoint import read_config
    try:
        read_config(d)
    except (ValueError, FileNotFoundError) as e:
        return f"--pretrained {path}: {e}"
    return None
