"""Optimizer benchmark (issue 6): ``python -m benchmarks.optim --help``."""
