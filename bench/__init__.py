"""Benchmarks, run by `make bench` (never as timed assertions in tests)."""
