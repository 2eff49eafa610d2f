"""minBERT encoder, the three task heads, and checkpoint loading."""
