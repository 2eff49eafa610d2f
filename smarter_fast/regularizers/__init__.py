"""Regularisers and multi-task gradient combination: SMART (smart.py), weight averages
(ema.py), gradient surgery (surgery.py)."""
