"""The model's configuration: the BERT encoder's (config.json) and the task heads' options.

Imports within smarter_fast.model run one way: config, then checkpoint I/O (files and tensor
names), then the encoder (bert), then the heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Hugging Face names for the activations we support -> the function BertLayer applies
# ("gelu" is the exact (erf) GELU).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}

# the task heads' options, and their config.json keys in a saved MultitaskBert (a Hugging Face
# loader ignores keys it does not know)
POOLINGS = ("cls", "mean")
PAIR_FEATURES = ("cross", "bi", "both")
PAIR_ORDERS = ("given", "symmetric")
CONFIG_KEYS = {"pooling": "smarter_fast_pooling", "pair_features": "smarter_fast_pair_features",
               "pair_order": "smarter_fast_pair_order"}


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string"}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a config.json value of the wrong type, by name
            value = getattr(self, f.name)
            expected = {"int": (int,), "float": (int, float), "str": (str,)}[f.type]
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be {_TYPE_WORDS[f.type]}, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                             f"expected one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Reads a Hugging Face config.json dict; keys we do not use are ignored."""
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        # model_type/architectures make the saved directory a valid HF BERT checkpoint.
        return {"model_type": "bert", "architectures": ["BertModel"], **dataclasses.asdict(self)}


__all__ = ["ACTIVATIONS", "BertConfig", "CONFIG_KEYS", "PAIR_FEATURES", "PAIR_ORDERS", "POOLINGS"]
