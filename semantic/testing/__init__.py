"""Helpers for tests and benchmarks: local model folders that need no download."""

from semantic.testing.local_models import PRESETS, build_local_model, load_local_model

__all__ = ["PRESETS", "build_local_model", "load_local_model"]
