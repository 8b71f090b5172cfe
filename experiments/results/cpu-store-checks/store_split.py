"""The CUDA store path's Python on CPU, split at the kernel launch: the pool made to take its CUDA path, the
kernel call replaced by an evaluated one-byte array (no kernel runs). Median of 1,000 stores (each released,
outside the clock) after 300 warm-ups, per EXP-006 case up to 90 MiB. Usage: PYTHONPATH=<tree> python
store_split.py [CASE to profile, e.g. 16x30]"""
import semantic  # noqa: F401  (loads OpenBLAS before MLX)
import cProfile
import pstats
import sys
import time

import mlx.core as mx
import numpy as np

from semantic.benchmarking import cases
from semantic.domain import services

services.writes_through_host = lambda: False
services.BlockPool.writes_in_place = property(lambda self: True)
DONE = mx.zeros((1,), mx.uint8)
mx.eval(DONE)
marks = {}


def launch(*args, **kwargs):
    marks["launch"] = time.perf_counter()
    return DONE


services.write_blocks_in_place = launch
services.write_described_blocks_in_place = launch
for case in cases.TARGET_CASES[:4]:
    ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
    before, after = [], []
    for i in range(1300):
        start = time.perf_counter()
        handle = cases.extract(ctx)
        end = time.perf_counter()
        handle.release()
        if i >= 300:
            before.append(marks["launch"] - start)
            after.append(end - marks["launch"])
    name = f"{case.blocks}x{case.layers}"
    print(f"{name}: before the launch {np.median(before) * 1e6:.1f} us, after it {np.median(after) * 1e6:.1f} us",
          flush=True)
    if sys.argv[1:] == [name]:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            cases.extract(ctx).release()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(22)
    cases.context.cache_clear()
