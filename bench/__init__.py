"""Benchmarks: `mindvl bench` (benchmark.py, its per-mode worker.py) and the scripts that run the standard
workloads and record BENCHMARKS.md. Figures are measured here, never asserted in tests."""
