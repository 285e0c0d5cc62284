"""Helpers to make local models and swarms for tests, the demo and benchmarks (nothing is downloaded)."""
