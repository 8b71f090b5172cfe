"""Shared fixtures: real mlx-lm models built locally (random weights, locally trained tokenizer)."""

import pytest

from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model


@pytest.fixture(scope="session")
def llama32():
    """A small llama in float32: greedy tokens do not depend on bf16 rounding of the batch layout."""
    return load_local_model("tiny-llama", dtype="float32")


@pytest.fixture(scope="session")
def gemma32():
    """Gemma 3 text with 5 sliding-window layers (window 128) per global layer, float32."""
    return load_local_model("tiny-gemma3", dtype="float32")


@pytest.fixture(scope="session")
def gemma512():
    """Gemma 3 text whose 512-token window spans several blocks, float32."""
    return load_local_model("tiny-gemma3-w512", dtype="float32")


@pytest.fixture(scope="session")
def qwen3():
    return load_local_model("tiny-qwen3", dtype="float32")


def make_engine(model_and_tokenizer, total_blocks=400, **kwargs):
    from semantic.application.batch_engine import BlockPoolBatchEngine

    model, tokenizer = model_and_tokenizer
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec=spec, total_blocks=total_blocks)
    return BlockPoolBatchEngine(model, tokenizer, pool, spec, **kwargs)
