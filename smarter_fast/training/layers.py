"""The command line's layers of training options (smarter_fast.train.parse_args):

    defaults < recipe (--recipe, else the --config file's `recipe`) < --config FILE < explicit flags

and on --resume of a run that has a checkpoint and an OUT/config.toml, that file instead of the
defaults, recipe and --config: the run continues with its own configuration. Options given
explicitly (flags, and the --config file's keys) must then equal it, but those in
config.CHANGEABLE_ON_RESUME, which take the new value; a recipe's values give way to it. A run
without config.toml (made before there was one) resumes as before: the flags are the
configuration and run.model_options checks the checkpoint's model options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import find_last_checkpoint
from .config import CHANGEABLE_ON_RESUME, LOCATION, MODEL_OPTIONS, ConfigError
from .config_files import CONFIG_FILE, ConfigFileError, load_options, option_names
from .recipes import recipe_options

# Values asked for that a run resolves (precision auto -> fp32 or bf16 for the device): on
# --resume they agree with whatever the run resolved them to.
RESOLVED_BY_THE_RUN = {"precision": "auto"}


class ResumeConflict(ConfigError):
    """Explicit options that contradict the configuration of the run to resume."""


def changeable_on_resume() -> tuple[str, ...]:
    """The options an explicit flag may change on --resume (CHANGEABLE_ON_RESUME that exist)."""
    names = option_names()
    return tuple(k for k in CHANGEABLE_ON_RESUME if k in names)


def resume_help() -> str:
    """What --help says of --resume and the run's config.toml."""
    return (f"with the run's configuration (OUT/config.toml); explicit flags that contradict it are "
            f"refused, but {', '.join(map(flag, changeable_on_resume()))} may change")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def explicit_options(parser: argparse.ArgumentParser, argv) -> dict:
    """{dest: value} of the options given on the command line `argv` (parsed, defaults aside)."""
    defaults = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in defaults:
            action.default = default


def parse_layers(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The Namespace of `argv` over the --config file over the recipe over the parser's defaults
    (on --resume: over the run's config.toml). Raises ConfigFileError for a bad file and
    ResumeConflict for explicit options a resumed run cannot take."""
    args = parser.parse_args(argv)  # --help and malformed flags, with the parser's own defaults
    explicit = explicit_options(parser, argv)
    from_file = load_options(args.config, parser) if args.config else {}
    recipe = explicit.get("recipe", from_file.get("recipe", args.recipe))
    from_recipe = recipe_options(recipe, parser)
    chosen = {k: v for k, v in {**from_file, **explicit}.items() if k in option_names() and k not in LOCATION}
    layers = {**from_recipe, **from_file, "recipe": recipe}
    out, resume = {**layers, **explicit}.get("out"), {**layers, **explicit}.get("resume", False)
    saved, kept = run_config_to_resume(out) if resume else None, {}
    if saved is not None:
        layers, kept = resumed_options(parser, saved, chosen, from_recipe, recipe)
        from_recipe = {}
    parser.set_defaults(**layers)
    args = parser.parse_args(argv)
    for key, value in kept.items():  # precision auto, asked again: what the run resolved it to
        setattr(args, key, value)
    # model options the recipe alone sets: on --resume the checkpoint's own take precedence
    args.model_options_from_recipe = [k for k in MODEL_OPTIONS if k in from_recipe and k not in chosen]
    return args


def run_config_to_resume(out) -> Path | None:
    """OUT/config.toml when --resume will continue the run in OUT from a checkpoint (its own, or
    an ensemble member's), else None (no run there yet: the options start it afresh)."""
    if out is None or not (Path(out) / CONFIG_FILE).is_file():
        return None
    dirs = [Path(out), *sorted(p for p in Path(out).glob("member*") if p.is_dir())]
    return Path(out) / CONFIG_FILE if any(find_last_checkpoint(d) is not None for d in dirs) else None


def _agrees(name: str, asked, used) -> bool:
    return asked == used or RESOLVED_BY_THE_RUN.get(name, object()) == asked


def resumed_options(parser, path: Path, chosen: dict, from_recipe: dict, recipe: str) -> tuple[dict, dict]:
    """(options, kept): the options of the run to resume (its config.toml at `path`) with the
    changeable ones of `chosen` (explicit flags and --config keys) applied, and the run's values
    of those asked for as they were before the run resolved them (RESOLVED_BY_THE_RUN). Raises
    ResumeConflict for chosen options that contradict the run's."""
    saved = load_options(path, parser)
    base = {a.dest: a.default for a in parser._actions}

    def used(name):
        return saved.get(name, base.get(name))

    changeable = changeable_on_resume()
    conflicts = [k for k, v in chosen.items() if k not in changeable and not _agrees(k, v, used(k))]
    if conflicts:
        said = "; ".join(f"{flag(k)} {_text(chosen[k])}: it was trained "
                         + (f"with {flag(k)} {_text(used(k))}" if used(k) is not None else f"without {flag(k)}")
                         for k in conflicts)
        raise ResumeConflict(f"cannot resume from {path.parent} with {said} ({path}; on --resume only "
                             f"{', '.join(map(flag, changeable))} may change)")
    for k, v in from_recipe.items():
        if k not in chosen and not _agrees(k, v, used(k)):
            print(f"--recipe {recipe}'s {k.replace('_', '-')} {_text(v)} gives way to the checkpoint's "
                  f"{_text(used(k))} on --resume", flush=True)
    changed = {k: v for k, v in chosen.items() if k in changeable and v != used(k)}
    if changed:
        print("--resume with " + ", ".join(f"{flag(k)} {_text(v)} (was {_text(used(k))})"
                                           for k, v in changed.items()), flush=True)
    kept = {k: used(k) for k, v in chosen.items() if k not in changeable and v != used(k)}  # they agree
    return {**saved, **changed}, kept


def _text(value) -> str:
    return "-" if value is None else str(value)


__all__ = ["ConfigFileError", "RESOLVED_BY_THE_RUN", "ResumeConflict", "changeable_on_resume", "explicit_options",
           "parse_layers", "resume_help", "resumed_options", "run_config_to_resume"]
