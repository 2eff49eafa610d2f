"""minBERT encoder, the three task heads, and checkpoint loading."""

from .bert import BertConfig, BertModel
from .checkpoint import default_checkpoint_dir, save_checkpoint
from .heads import MultitaskBert

__all__ = ["BertConfig", "BertModel", "MultitaskBert", "default_checkpoint_dir", "save_checkpoint"]
