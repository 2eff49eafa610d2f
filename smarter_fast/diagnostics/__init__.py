"""What the `info` and `selfcheck` commands report: the environment and backends (environment.py),
and the CUDA tests and timings (cuda.py)."""
