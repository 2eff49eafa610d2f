"""minBERT encoder, the task heads, checkpoint loading, and the gradient sinks that connect the
encoder to its optimizer (docs/design.md, "The model")."""

from .bert import BertConfig, BertModel
from .checkpoint import default_checkpoint_dir, save_checkpoint
from .grad_sinks import attach_grad_sinks
from .heads import MultitaskBert

__all__ = ["BertConfig", "BertModel", "MultitaskBert", "attach_grad_sinks", "default_checkpoint_dir",
           "save_checkpoint"]
