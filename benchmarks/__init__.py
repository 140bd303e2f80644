"""Benchmark scripts (importable so the test suite can smoke-run the optimizer harness)."""
