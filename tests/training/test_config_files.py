"""Config files (smarter_fast.training.config_files, .layers, .recipes): --config FILE.toml sets
any training option; recipes are TOML files (shipped, or a user's own); defaults < recipe <
--config < explicit flags; unknown keys, wrong types and bad values are errors naming the key;
every run writes OUT/config.toml, which repeats the run and which --resume keeps to."""

import json
from pathlib import Path

import pytest

from smarter_fast.train import build_parser, main, parse_args
from smarter_fast.training.checkpoint import CHECKPOINT_FILES
from smarter_fast.training.config import TrainConfig
from smarter_fast.training.config_files import config_text, config_values, load_options
from smarter_fast.training.layers import ResumeConflict, changeable_on_resume
from smarter_fast.training.recipes import RECIPES, describe, recipe_defaults

# the recipes as they were written in Python (smarter_fast/training/recipes.py) before they became files
OLD_RECIPES = {
    "report": {},
    "minilm-cpu": {"pooling": "mean", "pair_features": "cross", "pair_order": "symmetric", "schedule": "sqrt",
                   "batch_size": 16, "lr": 5e-5, "lr_schedule": "linear", "warmup_ratio": 0.05,
                   "dropout": 0.1, "ema": 0.999, "precision": "auto"},
}


def toml(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- recipes --------------------------------------------------------------------------------------
def test_shipped_recipes_are_the_old_python_values():
    assert list(RECIPES) == list(OLD_RECIPES)
    for name, values in OLD_RECIPES.items():
        got = recipe_defaults(name)
        assert got == values, name
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in values.items()}, name
    import smarter_fast.training.recipes as recipes
    shipped = sorted(p.name for p in Path(recipes.__file__).parent.glob("*.toml"))
    assert shipped == ["minilm-cpu.toml", "report.toml"]


def test_help_shows_the_shipped_recipes_and_the_defaults_of_config_and_recipe(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE.toml" in text and "(default: none)" in text
    assert "--recipe NAME|FILE.toml" in text and "(default: report)" in text
    for name in RECIPES:
        assert f"{name} (" in text
    assert "config.toml" in text  # --resume says what it keeps to


def test_a_user_recipe_file_works_like_a_shipped_one(tmp_path):
    path = toml(tmp_path, 'lr = 2e-5\nsmart = "simple"\nsmart-sigma = 0.1\nbatch_size = 6\n', "mine.toml")
    a = parse_args(["--recipe", path])
    assert (a.recipe, a.lr, a.smart, a.smart_sigma, a.batch_size) == (path, 2e-5, "simple", 0.1, 6)
    assert parse_args(["--recipe", path, "--batch-size", "3"]).batch_size == 3
    settings, overrides = describe(path, a, {x.dest: x.default for x in build_parser()._actions})
    assert settings["smart_sigma"] == 0.1 and "smart_sigma" not in overrides  # outside RECIPE_KEYS, described too


def test_a_recipe_cannot_name_a_recipe_and_an_unknown_one_is_refused(tmp_path, capsys):
    path = toml(tmp_path, 'recipe = "minilm-cpu"\n', "r.toml")
    assert "a recipe cannot name another recipe" in error_of(["--recipe", path], capsys)
    assert "recipe file nope.toml not found" in error_of(["--recipe", "nope.toml"], capsys)


# ---- precedence -----------------------------------------------------------------------------------
def test_each_layer_wins_over_the_one_below(tmp_path):
    """defaults < recipe (here named by the config file) < --config < explicit flags."""
    cfg = toml(tmp_path, 'recipe = "minilm-cpu"\nbatch-size = 12\ndropout = 0.2\nseed = 3\n')
    a = parse_args(["--config", cfg, "--dropout", "0.3"])
    assert (a.max_length, a.weight_decay) == (128, 0.0)  # defaults: nobody sets them
    assert (a.recipe, a.schedule, a.lr, a.ema) == ("minilm-cpu", "sqrt", 5e-5, 0.999)  # the recipe
    assert (a.batch_size, a.seed) == (12, 3)  # --config over the recipe's batch 16 and the default seed
    assert a.dropout == 0.3  # the flag over the config file's 0.2 (and the recipe's 0.1)
    b = parse_args(["--config", cfg, "--recipe", "report"])  # an explicit --recipe replaces the file's
    assert (b.recipe, b.schedule, b.lr, b.batch_size, b.dropout) == ("report", "split1", None, 12, 0.2)
    assert parse_args(["--config", cfg]).dropout == 0.2
    assert parse_args(["--recipe", "minilm-cpu"]).dropout == 0.1


def test_model_options_of_the_recipe_alone_are_marked_for_resume(tmp_path):
    cfg = toml(tmp_path, 'recipe = "minilm-cpu"\npooling = "cls"\n')
    a = parse_args(["--config", cfg, "--pair-order", "given"])
    assert a.model_options_from_recipe == ["pair_features"]  # pooling: the file; pair_order: a flag


# ---- errors naming the key ------------------------------------------------------------------------
@pytest.mark.parametrize("text,words", [
    ("batch_sise = 4\n", ["unknown key 'batch_sise'", "did you mean batch_size?"]),
    ("[training]\nlr = 1e-4\n", ["unknown key 'training'"]),
    ('batch_size = "8"\n', ["batch_size = \"8\"", "expected an integer, got a string"]),
    ("batch_size = 8.0\n", ["batch_size = 8.0", "expected an integer, got a float"]),
    ('lr = "1e-4"\n', ["lr = \"1e-4\"", "expected a number"]),
    ("interleave = 1\n", ["interleave = 1", "expected true or false, got an integer"]),
    ("epochs = true\n", ["epochs = true", "expected an integer, got a boolean"]),
    ("split_parts = 2.5\n", ["split_parts = 2.5", "expected an integer or a string"]),
    ("batch_size = 4\nbatch-size = 5\n", ["batch_size is set twice"]),
    ("lr = \n", ["not valid TOML"]),
], ids=["unknown", "table", "str-for-int", "float-for-int", "str-for-float", "int-for-bool",
        "bool-for-int", "float-for-int-or-str", "twice", "syntax"])
def test_unknown_keys_and_wrong_types_are_errors_naming_the_key(tmp_path, capsys, text, words):
    path = toml(tmp_path, text)
    err = error_of(["--config", path], capsys)
    assert path in err and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("text,words", [
    ("batch_size = 0\n", ["batch_size = 0", "--batch-size must be >= 1, got 0"]),
    ('schedule = "nope"\n', ['schedule = "nope"', "expected one of", '"split1"']),
    ("dropout = 1.5\n", ["dropout = 1.5", "--dropout must be < 1.0"]),
    ('split_parts = "x"\n', ['split_parts = "x"', "--split-parts must be 'auto'"]),
    ("max_length = 4\n", ["max_length = 4", "--max-length must be >= 8"]),  # TrainConfig.validate
    ('recipe = "nope"\n', ['recipe = "nope"', "invalid choice"]),
], ids=["batch-0", "schedule", "dropout", "split-parts", "max-length", "recipe"])
def test_bad_values_are_errors_naming_the_key(tmp_path, capsys, text, words):
    path = toml(tmp_path, text)
    err = error_of(["--config", path], capsys)
    assert path in err
    for w in words:
        assert w in err, (w, err)


def test_right_types_are_taken(tmp_path):
    a = parse_args(["--config", toml(tmp_path, 'lr = 1\nsplit_parts = 3\ninterleave = true\nwarmup_steps = 0\n')])
    assert (a.lr, type(a.lr), a.split_parts, a.interleave, a.warmup_steps) == (1.0, float, 3, True, 0)
    assert parse_args(["--config", toml(tmp_path, 'split_parts = "auto"\n')]).split_parts == "auto"


def test_a_missing_config_file_is_one_clean_error(tmp_path, capsys):
    assert "config file not found" in error_of(["--config", str(tmp_path / "no.toml")], capsys)


# ---- config.toml ----------------------------------------------------------------------------------
def test_config_toml_round_trips_and_leaves_out_bookkeeping_location_and_none(tmp_path):
    c = TrainConfig(lr=3e-5, pooling="mean", pair_features="cross", pair_order="given", out="x", resume=True,
                    precision="bf16", precision_requested="auto", model_options_from_recipe=["pooling"])
    text = config_text(c)
    assert text.startswith("# The resolved configuration")
    values = config_values(c)
    for gone in ("out", "resume", "precision_requested", "model_options_from_recipe", "time_budget", "limit"):
        assert gone not in values and f"\n{gone} =" not in text
    assert load_options(toml(tmp_path, text), build_parser()) == values


def test_the_allow_list_names_options():
    names = set(changeable_on_resume())
    assert {"epochs", "time_budget", "save_every", "num_threads", "eval_batch_size", "max_nonfinite",
            "backend"} <= names
    assert names <= {f for f in TrainConfig.__dataclass_fields__}
    assert not names & {"batch_size", "lr", "seed", "schedule", "pooling", "precision", "recipe"}


# ---- --resume against a run's config.toml (a checkpoint's files stand in for a checkpoint) ---------
@pytest.fixture
def resumable(tmp_path):
    out = tmp_path / "run"
    last = out / "checkpoints" / "last"
    last.mkdir(parents=True)
    for f in CHECKPOINT_FILES:
        (last / f).write_text("")
    saved = TrainConfig(recipe="minilm-cpu", pooling="cls", pair_features="cross", pair_order="symmetric",
                        schedule="sqrt", batch_size=4, lr=1e-3, lr_schedule="linear", warmup_ratio=0.05,
                        dropout=0.1, ema=0.999, precision="bf16", epochs=1, seed=7)
    (out / "config.toml").write_text(config_text(saved))
    return out


def test_resume_takes_the_runs_configuration_and_allow_listed_changes(resumable, capsys):
    a = parse_args(["--resume", "--out", str(resumable), "--epochs", "3", "--save-every", "2",
                    "--precision", "auto", "--seed", "7"])
    assert (a.epochs, a.save_every) == (3, 2)  # allow-listed
    assert (a.recipe, a.batch_size, a.lr, a.pooling, a.seed, a.precision) == \
           ("minilm-cpu", 4, 1e-3, "cls", 7, "bf16")  # kept; auto agrees with what it resolved to
    assert a.model_options_from_recipe == []
    assert "--epochs 3 (was 1)" in capsys.readouterr().out


def test_resume_refuses_contradicting_flags_naming_both_values(resumable):
    with pytest.raises(ResumeConflict) as e:
        parse_args(["--resume", "--out", str(resumable), "--batch-size", "8", "--epochs", "2"])
    msg = str(e.value)
    assert "--batch-size 8: it was trained with --batch-size 4" in msg and "config.toml" in msg
    assert "--epochs" in msg  # the message lists what may change
    with pytest.raises(ResumeConflict, match="--limit 5: it was trained without --limit"):
        parse_args(["--resume", "--out", str(resumable), "--limit", "5"])


def test_resume_refuses_a_contradicting_config_file_and_recipe_values_give_way(resumable, tmp_path, capsys):
    cfg = toml(tmp_path, "seed = 8\n")
    with pytest.raises(ResumeConflict, match="it was trained with --seed 7"):
        parse_args(["--resume", "--out", str(resumable), "--config", cfg])
    a = parse_args(["--resume", "--out", str(resumable), "--recipe", "minilm-cpu"])
    assert (a.pooling, a.batch_size) == ("cls", 4)
    said = capsys.readouterr().out
    assert "--recipe minilm-cpu's pooling mean gives way to the checkpoint's cls" in said
    assert "batch-size 16 gives way to the checkpoint's 4" in said


def test_resume_without_a_checkpoint_takes_the_flags(resumable):
    import shutil
    shutil.rmtree(resumable / "checkpoints")  # nothing to continue: a fresh run of these flags
    assert parse_args(["--resume", "--out", str(resumable), "--batch-size", "8"]).batch_size == 8


def test_resume_of_an_ensemble_keeps_to_its_config_toml(resumable):
    (resumable / "member1").mkdir()  # its checkpoints are its members'
    (resumable / "checkpoints").rename(resumable / "member1" / "checkpoints")
    with pytest.raises(ResumeConflict, match="--batch-size 8: it was trained with --batch-size 4"):
        parse_args(["--resume", "--out", str(resumable), "--batch-size", "8"])


def test_main_reports_a_resume_conflict_as_one_line(resumable, capsys):
    assert main(["--resume", "--out", str(resumable), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume from") and "Traceback" not in err


# ---- end to end -----------------------------------------------------------------------------------
SIZES = {"sst": {"train": 16, "dev": 8, "test-student": 4},
         "quora": {"train": 24, "dev": 8, "test-student": 4},
         "sts": {"train": 12, "dev": 8, "test-student": 4}}


@pytest.fixture(scope="module")
def tiny(make_tiny_run):
    return make_tiny_run(SIZES, "tiny_config_files")


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def comparable(out):
    timing = ("seconds", "per_second", "minutes")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows(out)]


def test_a_runs_config_toml_repeats_it_and_resume_keeps_to_it(tiny, tmp_path, capsys):
    ckpt, data = tiny
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--data-dir", str(data), "--pretrained", str(ckpt), "--out", str(a), "--epochs", "1",
                 "--batch-size", "4", "--eval-batch-size", "8", "--lr", "1e-3", "--max-length", "48",
                 "--num-threads", "1", "--split-parts", "2", "--smart", "simple", "--dropout", "0.1",
                 "--seed", "3", "--pair-order", "symmetric"]) == 0
    saved = load_options(a / "config.toml", build_parser())
    assert (saved["lr"], saved["pooling"], saved["pair_features"], saved["precision"]) == \
           (1e-3, "cls", "cross", "fp32")  # resolved by the run
    assert "out" not in saved and "precision_requested" not in saved and (a / "args.json").is_file()
    assert main(["--config", str(a / "config.toml"), "--out", str(b)]) == 0
    assert len(rows(a)) == 1 and comparable(b) == comparable(a)
    capsys.readouterr()
    # --resume: a contradicting flag is refused, an allow-listed one changes; the rest is config.toml's
    assert main(["--resume", "--out", str(a), "--epochs", "2", "--batch-size", "8"]) == 2
    assert "it was trained with --batch-size 4" in capsys.readouterr().err
    assert main(["--resume", "--out", str(a), "--epochs", "2"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    r = rows(a)
    assert len(r) == 2 and r[1]["recipe_settings"]["batch_size"] == 4 and r[1]["recipe_settings"]["smart"] == "simple"
    assert load_options(a / "config.toml", build_parser())["epochs"] == 2
