"""Timing scripts (python -m benchmarks.<name>); they print tables and ratios, never assert speed."""
