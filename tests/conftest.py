"""Shared fixtures: real mlx-lm models built locally (random weights, locally trained tokenizer), and
the environment asv runs in."""

import os
import pathlib

import pytest

from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives headless chromium (.ci/install-browser.sh installs it)")


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


def run_in_threads(target, *args, count: int = 3) -> None:
    """``target(*args)`` in ``count`` threads at once; the first error any of them raised fails the test here."""
    import threading

    errors = []

    def run():
        try:
            target(*args)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:1]


def make_engine(model_and_tokenizer, total_blocks=400, pool_format=None, **kwargs):
    from semantic.application.batch_engine import BlockPoolBatchEngine

    model, tokenizer = model_and_tokenizer
    spec = ModelCacheSpec.from_model(model).with_format(pool_format)
    pool = BlockPool(spec=spec, total_blocks=total_blocks)
    return BlockPoolBatchEngine(model, tokenizer, pool, spec, **kwargs)


@pytest.fixture(scope="session")
def asv_home(tmp_path_factory) -> dict:
    """Environment variables for asv subprocesses: a throwaway HOME with a machine file in it."""
    from asv_helpers import asv

    home = tmp_path_factory.mktemp("home")
    env = dict(
        os.environ,
        HOME=str(home),
        # What HOME would have moved: built local models and pip's download cache.
        SEMANTIC_MODEL_CACHE=os.environ.get("SEMANTIC_MODEL_CACHE")
        or str(pathlib.Path.home() / ".cache" / "semantic" / "models"),
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR") or str(pathlib.Path.home() / ".cache" / "pip"),
    )
    env.pop("SEMANTIC_BENCH_FULL", None)  # the tests run the default suite
    asv(env, None, "machine", "--yes")
    return env


@pytest.fixture(scope="session")
def asv_env_dir(tmp_path_factory) -> pathlib.Path:
    """One folder for the virtualenvs asv builds from the project's matrix (MLX, mlx-lm: about a
    minute to install), shared by every test that runs asv on a throwaway repository."""
    return tmp_path_factory.mktemp("asv-env")
