"""--recipe presets: the report recipe is the CLI's defaults; a preset sets defaults that
explicit flags override; the resolved settings are described for the run's log."""

import pytest

from smarter_fast.training.recipes import RECIPE_KEYS, RECIPES, describe, format_settings, recipe_defaults
from smarter_fast.train import DEFAULT_EPOCHS, build_parser, parse_args


def parser_defaults():
    return {a.dest: a.default for a in build_parser()._actions}


def test_report_recipe_is_the_cli_defaults():
    assert parse_args([]) == parse_args(["--recipe", "report"])
    a = parse_args([])
    assert (a.batch_size, a.lr, a.schedule, a.interleave, a.epochs, a.precision, a.smart) == \
           (8, None, "split1", False, DEFAULT_EPOCHS, "fp32", "off")


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "report"])
def test_preset_values_are_applied_and_flags_override(name):
    preset = recipe_defaults(name)
    assert preset and set(preset) <= set(RECIPE_KEYS)
    a = parse_args(["--recipe", name])
    for k, v in preset.items():
        assert getattr(a, k) == v, k
    b = parse_args(["--recipe", name, "--lr", "3e-4", "--batch-size", "5"])
    assert (b.lr, b.batch_size) == (3e-4, 5)
    settings, overrides = describe(name, b, parser_defaults())
    assert overrides["lr"] == (preset.get("lr"), 3e-4)
    assert overrides["batch_size"] == (preset.get("batch_size", 8), 5)
    assert set(settings) == set(RECIPE_KEYS)
    assert "lr 0.0003" in format_settings(settings)


def test_unknown_recipe_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_defaults("nope")


def test_time_budget_leaves_epochs_unbounded_unless_given():
    assert parse_args(["--time-budget", "5"]).epochs is None
    assert parse_args(["--time-budget", "5", "--epochs", "3"]).epochs == 3
    with pytest.raises(SystemExit):
        parse_args(["--time-budget", "0"])
    with pytest.raises(SystemExit):  # the annealed sampler needs its horizon
        parse_args(["--time-budget", "5", "--schedule", "annealed"])
