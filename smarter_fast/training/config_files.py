"""Config files: training options in TOML (`--config FILE`, `--recipe NAME|FILE`, OUT/config.toml).

A config file is one flat TOML table of TrainConfig options. Its keys are the field names
(`batch_size`; the flag's spelling `batch-size` is the same key); its values are TOML strings,
integers, floats and booleans of the field's type (an integer where a number is expected, so
`lr = 1` is 1.0). Every value passes the checks of its command-line flag (its parser and choices,
given the parser) and TrainConfig.validate; an unknown key, a wrong type or a bad value is a
ConfigFileError naming the file and the key. Paths in a config file are relative to the working
directory, as on the command line.

Every run writes its resolved configuration (the learning rate, model options and precision as
the run resolved them; no None values, bookkeeping or location fields) to OUT/config.toml:
`--config OUT/config.toml --out NEW` repeats the run. The command line's layering of files and
flags: smarter_fast.training.layers. Reads with tomllib (tomli before Python 3.11), writes with
tomli-w.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path

from .config import BOOKKEEPING, LOCATION, ConfigError, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

CONFIG_FILE = "config.toml"
HEADER = ("# The resolved configuration of the training run in this directory (smarter_fast.train).\n"
          "# `python -m smarter_fast.train --config THIS_FILE --out NEW_DIR` repeats the run;\n"
          "# `--resume --out THIS_DIR` continues it with this configuration.\n")
MEMBER_NOTE = ("# One member of an ensemble, as a run of its own (ensemble = 1); the ensemble's\n"
               "# configuration is ../config.toml.\n")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "tuple": list, "dict": dict}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "a table"}
_GOT_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
              dict: "a table"}


class ConfigFileError(ConfigError):
    """A config file that cannot be read or holds a bad key or value (the message names both)."""


def option_names() -> tuple[str, ...]:
    """The keys a config file may set: TrainConfig's fields but the bookkeeping ones."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in BOOKKEEPING)


def field_types() -> dict[str, tuple | None]:
    """{option: the Python types of its values}, from TrainConfig's annotations (None: no check
    here, for an annotation this reading does not know)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in BOOKKEEPING:
            continue
        names = [t.strip().split("[")[0] for t in str(f.type).split("|")]
        types = [_TYPES.get(n) for n in names if n not in ("None", "NoneType")]
        out[f.name] = None if not types or None in types else tuple(dict.fromkeys(types))
    return out


def show(value) -> str:
    """A value as TOML writes it (strings quoted, true/false)."""
    return json.dumps(value) if isinstance(value, (str, bool, list, dict)) else repr(value)


def parse_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{source}: not valid TOML: {e}") from None


def read_toml(path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: cannot read it: {e}") from None
    return parse_toml(text, str(path))


def load_options(path, parser=None) -> dict:
    """The checked options of the TOML file at `path` (check_options)."""
    return check_options(read_toml(path), str(path), parser)


def check_options(raw: dict, source: str, parser=None) -> dict:
    """{option: value} of a parsed config file: keys made field names, each value of its field's
    type, through its flag's parser and choices (given the argparse `parser`), and validated by
    TrainConfig.validate. Raises ConfigFileError naming `source` and the key."""
    types, actions = field_types(), {a.dest: a for a in parser._actions} if parser is not None else {}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigFileError(f"{source}: unknown key {key!r}{hint}; the keys are the training options "
                                  f"(python -m smarter_fast.train --help), e.g. batch_size")
        if name in out:
            raise ConfigFileError(f"{source}: {name} is set twice ({key!r} is the same key)")
        value = _typed(name, value, types[name], source)
        out[name] = _through_flag(name, value, actions.get(name), source)
    _validate(out, source)
    return out


def _typed(name: str, value, types, source: str):
    """`value` as its field's type (an int where a float is expected becomes one)."""
    if types is None:
        return value
    if isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int) and int not in types and float in types:
        value, ok = float(value), True
    else:
        ok = isinstance(value, types)
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        got = _GOT_NAMES.get(type(value), type(value).__name__)
        raise ConfigFileError(f"{source}: {name} = {show(value)}: expected {expected}, got {got}")
    return value


def _through_flag(name: str, value, action, source: str):
    """`value` through its flag's `type=` parser and choices, as the same text on the command
    line would go (each item of a list)."""
    if action is None:
        return value
    items = []
    for item in value if isinstance(value, list) else [value]:
        if callable(action.type) and not isinstance(item, bool):
            try:
                item = action.type(str(item))
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise ConfigFileError(f"{source}: {name} = {show(value)}: {e}") from None
        if action.choices is not None and item not in action.choices:
            raise ConfigFileError(f"{source}: {name} = {show(value)}: expected one of "
                                  f"{', '.join(map(show, action.choices))}")
        items.append(item)
    return items if isinstance(value, list) else items[0]


def _validate(options: dict, source: str) -> None:
    """TrainConfig.validate on the file's options; a key whose value fails on its own is named
    (a combination that fails is left to the run's whole configuration, which other layers
    may complete)."""
    try:
        TrainConfig(**options).validate()
        return
    except ConfigError:
        pass
    for name, value in options.items():
        try:
            TrainConfig(**{name: value}).validate()
        except ConfigError as e:
            raise ConfigFileError(f"{source}: {name} = {show(value)}: {e}") from None


# ---- writing --------------------------------------------------------------------------------------
def config_values(config: TrainConfig) -> dict:
    """What config.toml records: every option set (None left out), bookkeeping and location aside."""
    return {k: v for k, v in config.to_dict().items()
            if k not in BOOKKEEPING and k not in LOCATION and v is not None}


def config_text(config: TrainConfig, note: str = "") -> str:
    try:
        import tomli_w
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e}: writing OUT/config.toml needs tomli-w, a dependency of smarter_fast "
                                  f"(pip install tomli-w)") from None
    return HEADER + note + "\n" + tomli_w.dumps(config_values(config))


def write_config(out_dir, config: TrainConfig, note: str = "") -> Path:
    """OUT/config.toml, atomically (the caller writes it on the main rank only)."""
    from ..report import atomic_write_text
    return atomic_write_text(Path(out_dir) / CONFIG_FILE, config_text(config, note))


__all__ = ["CONFIG_FILE", "ConfigFileError", "check_options", "config_text", "config_values", "field_types",
           "load_options", "option_names", "parse_toml", "read_toml", "show", "write_config"]
