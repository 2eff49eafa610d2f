"""smarter_fast: fast multi-task fine-tuning of BERT encoders with SMART regularisation.

Use a trained model: `smarter_fast.load(checkpoint_dir)` returns a Predictor with
predict_sentiment, predict_paraphrase, predict_similarity and embed on text
(smarter_fast.inference). The library: smarter_fast.model (BertModel, MultitaskBert,
attach_grad_sinks), smarter_fast.ops (attention, attention_varlen, adamw_step_, smart_noise,
smart_mse, dropout_add_layer_norm), smarter_fast.optim (AdamW, learning-rate schedules),
smarter_fast.regularizers (SMART, EMA, gradient surgery), smarter_fast.data (load_tokenizer, CS224N
readers, batching, schedules), smarter_fast.tasks (the task registry and losses),
smarter_fast.evaluation. The training application: smarter_fast.training. The commands:
`python -m smarter_fast.train | evaluate | predict | export | ablate | info | build | selfcheck`,
also `smarter-fast <command>` and `python -m smarter_fast <command>` (smarter_fast/cli.py).
The layers: docs/design.md.
"""

__version__ = "0.1.0"

# Loaded on first use: `python -m smarter_fast.<command>` imports this package first, and the
# commands set OpenMP's environment before torch loads.
_LAZY = {"load": "inference", "Predictor": "inference", "Sentiment": "inference",
         "Paraphrase": "inference", "Similarity": "inference"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", *_LAZY]
