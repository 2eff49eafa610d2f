"""Training recipes for `python -m smarter_fast.train --recipe NAME|FILE`: TOML files of options.

A recipe is a set of option defaults: `--recipe minilm-cpu --lr 1e-4` takes everything from the
recipe except the learning rate. The shipped recipes are the .toml files beside this module
(package data), each explained by its comments; `--recipe FILE.toml` reads a recipe of your own
the same way. Its keys and values are a config file's (smarter_fast.training.config_files), but a
recipe cannot name another recipe. The resolved recipe is printed at the start of a run and
recorded in every row of metrics.jsonl (`recipe`, `recipe_settings`), explicit overrides included.

- report.toml:     the "SMARTer BERT" report's recipe, unchanged; the CLI's defaults (sets nothing).
- minilm-cpu.toml: the most dev quality per CPU-minute found for the embedded all-MiniLM-L6-v2 on
                   a 2-core AVX-512 CPU (search and table: README, "Recipes").
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from ..config_files import ConfigFileError, check_options, load_options, parse_toml, show


def _shipped() -> dict[str, tuple[str, str]]:
    """{name: (source, TOML text)} of the recipe files shipped in this package, report first."""
    files = [f for f in resources.files(__name__).iterdir() if f.name.endswith(".toml")]
    files.sort(key=lambda f: (f.name != "report.toml", f.name))
    return {f.name[:-len(".toml")]: (f"recipe {f.name[:-5]} ({f})", f.read_text(encoding="utf-8"))
            for f in files}


_FILES = _shipped()
RECIPES: dict[str, dict] = {name: check_options(parse_toml(text, source), source)
                            for name, (source, text) in _FILES.items()}


def recipe_summary(name: str) -> str:
    """The first comment line of shipped recipe `name`."""
    first = _FILES[name][1].splitlines()[0] if _FILES[name][1] else ""
    return first.lstrip("#").strip()


def recipe_help() -> str:
    """The shipped recipes for --help: `name (summary)`, ..."""
    return ", ".join(f"{n} ({recipe_summary(n)})" for n in RECIPES).replace("%", "%%")


def recipe_arg(text: str) -> str:
    """argparse type of --recipe (and of a config file's `recipe`): a shipped name or a file."""
    if text in RECIPES or Path(text).is_file():
        return text
    if text.endswith(".toml") or "/" in text:
        raise argparse.ArgumentTypeError(f"recipe file {text} not found")
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                     f"{', '.join(map(repr, RECIPES))}, or a recipe file FILE.toml)")


def recipe_options(name: str, parser=None) -> dict:
    """The options (TrainConfig field -> value) of shipped recipe `name`, or of the recipe file
    at path `name`; checked by the flags' parsers too when given the command line's `parser`."""
    if name in RECIPES:
        source = _FILES[name][0]
        values = check_options(RECIPES[name], source, parser) if parser is not None else dict(RECIPES[name])
    elif Path(name).is_file():
        source, values = name, load_options(name, parser)
    else:
        raise ConfigFileError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)} or a "
                              f"recipe file FILE.toml")
    if "recipe" in values:
        raise ConfigFileError(f"{source}: recipe = {show(values['recipe'])}: a recipe cannot name another recipe")
    return values


def recipe_defaults(name: str) -> dict:
    """The flag defaults (argparse dest -> value) of recipe `name` (a shipped name or a file)."""
    return recipe_options(name)


# The settings a recipe is made of, printed in this order at the start of a run.
RECIPE_KEYS = ("pooling", "pair_features", "pair_order", "schedule", "split_parts", "interleave", "batch_size",
               "lr", "lr_schedule", "warmup_ratio", "layer_decay", "weight_decay", "dropout", "label_smoothing",
               "ema", "ensemble", "smart", "precision", "epochs", "time_budget")


def describe(name: str, args, parser_defaults: dict) -> tuple[dict, dict]:
    """(settings, overrides): every RECIPE_KEYS value this run uses, and those an explicit flag
    changed from the recipe ({key: (recipe value, used value)}). `parser_defaults` are the CLI's
    own defaults (what the recipe does not set)."""
    preset = recipe_defaults(name)
    keys = (*RECIPE_KEYS, *(k for k in preset if k not in RECIPE_KEYS))  # a recipe file may set others
    settings = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    overrides = {}
    for k, used in settings.items():
        recipe_value = preset.get(k, parser_defaults.get(k))
        # a setting resolved at run time (precision auto -> fp32) is compared as it was asked for
        if getattr(args, f"{k}_requested", used) != recipe_value:
            overrides[k] = (recipe_value, getattr(args, f"{k}_requested", used))
    return settings, overrides


def format_settings(settings: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')} {'-' if v is None else format(v, 'g') if isinstance(v, float) else v}"
                     for k, v in settings.items())


__all__ = ["RECIPES", "RECIPE_KEYS", "describe", "format_settings", "recipe_arg", "recipe_defaults", "recipe_help",
           "recipe_options", "recipe_summary"]
