"""Named training recipes for `python -m smarter_fast.train --recipe NAME`.

A recipe is a set of flag defaults: `--recipe minilm-cpu --lr 1e-4` takes everything from the
recipe except the learning rate. The resolved recipe is printed at the start of a run and recorded
in every row of metrics.jsonl (`recipe`, `recipe_settings`), explicit overrides included.

- report:     the "SMARTer BERT" report's recipe, unchanged (batch 8, lr 1e-5, split1, tasks one
              after the other, [CLS] pooling, one sequence per pair, fp32); the CLI's defaults.
- minilm-cpu: the most dev quality per CPU-minute found for the embedded all-MiniLM-L6-v2 on a
              2-core AVX-512 CPU (search and table: README, "Recipes").
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "report": {},
    "minilm-cpu": {
        "pooling": "mean",  # the checkpoint was trained as a mean-pooling sentence encoder
        "pair_features": "cross",  # one [CLS] s1 [SEP] s2 [SEP] sequence (as good as both in the recipe search, and faster: README.md)
        "pair_order": "symmetric",  # pairs trained in random order, predicted from both orders
        "schedule": "sqrt",  # batches of all tasks interleaved: nothing is forgotten
        "batch_size": 16,
        "lr": 5e-5,  # 40-min runs: 0.741 mean against 0.732 at 1e-4 (SST overfits less; README)
        "lr_schedule": "linear",
        "warmup_ratio": 0.05,
        "dropout": 0.1,
        "ema": 0.999,  # evaluate the weights' moving average: SST swung by +-0.03 between epochs
        "precision": "auto",  # bf16 where the CPU has AVX512-BF16 or AMX, else fp32 (smarter_fast.precision)
    },
}


def recipe_defaults(name: str) -> dict:
    """The flag defaults (argparse dest -> value) of recipe `name`."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


# The settings a recipe is made of, printed in this order at the start of a run.
RECIPE_KEYS = ("pooling", "pair_features", "pair_order", "schedule", "split_parts", "interleave", "batch_size",
               "lr", "lr_schedule", "warmup_ratio", "layer_decay", "weight_decay", "dropout", "label_smoothing",
               "ema", "ensemble", "smart", "precision", "epochs", "time_budget")


def describe(name: str, args, parser_defaults: dict) -> tuple[dict, dict]:
    """(settings, overrides): every RECIPE_KEYS value this run uses, and those an explicit flag
    changed from the recipe ({key: (recipe value, used value)}). `parser_defaults` are the CLI's
    own defaults (what the recipe does not set)."""
    preset = recipe_defaults(name)
    settings = {k: getattr(args, k) for k in RECIPE_KEYS if hasattr(args, k)}
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


__all__ = ["RECIPES", "RECIPE_KEYS", "recipe_defaults", "describe", "format_settings"]
