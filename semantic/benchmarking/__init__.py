"""Benchmark cases and helpers shared by benchmarks/ and experiments/."""
