"""The asv benchmark suite of semantic: see docs/benchmarks.md."""
