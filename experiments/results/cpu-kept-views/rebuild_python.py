"""Microseconds of Python in a 1 x 12 rebuild from the views the pool keeps (smollm2-135m geometry, CPU,
mean of 5000 after 100), then a cProfile of 5000 more:

    PYTHONPATH=$PWD python experiments/results/cpu-kept-views/rebuild_python.py
"""
import cProfile
import pstats
import time

import semantic  # noqa: F401  (first: it loads OpenBLAS before MLX)
from semantic.application.block_cache import blocks_to_cache
from semantic.benchmarking import cases

ctx = cases.context("smollm2-135m", 1, 12)


def rebuild_many(n):
    for _ in range(n):
        blocks_to_cache(ctx.pool, ctx.handle)


rebuild_many(100)
start = time.perf_counter()
rebuild_many(5000)
print("us per rebuild:", (time.perf_counter() - start) / 5000 * 1e6)
profile = cProfile.Profile()
profile.enable()
rebuild_many(5000)
profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(18)
