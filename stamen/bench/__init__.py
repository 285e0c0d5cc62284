"""Benchmarks: Stamen side by side with local baselines, in one process run."""
