"""The training application: a typed TrainConfig, the Trainer's one epoch loop, its stateful
components and the Checkpointer (docs/design.md)."""

from .config import ConfigError, TrainConfig
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer"]
