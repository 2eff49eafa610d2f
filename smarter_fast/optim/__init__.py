"""Optimisation: the flat-buffer AdamW (adamw.py) and the learning-rate schedules
(lr_schedule.py)."""

from .adamw import AdamW, FlatBuffers

__all__ = ["AdamW", "FlatBuffers"]
