"""A store (cases.extract, released outside the clock) against memcpy of its bytes, on CPU, for whichever tree
PYTHONPATH names: p50 ms over 200 calls after 10 warm-ups, per EXP-006 case up to 90 MiB.
Usage: PYTHONPATH=<tree> python ab_store_cpu.py LABEL"""
import json
import sys
import time

import semantic  # noqa: F401  (loads OpenBLAS before MLX)
import numpy as np

from semantic.benchmarking import cases


def p50(fn, after=None, repeat=200, warmup=10):
    samples = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
        if after is not None:
            after(out)
    return float(np.median(samples[warmup:])) * 1e3


row = {"tree": semantic.__file__}
for case in cases.TARGET_CASES[:4]:
    ctx = cases.context(case.geometry, case.blocks, case.layers, case.blocks)
    src, dst = cases.memcpy_source(ctx.nbytes)
    store = p50(lambda: cases.extract(ctx), after=lambda handle: handle.release())
    copy = p50(lambda: cases.memcpy(src, dst))
    row[f"{case.blocks}x{case.layers}"] = {"store_ms": round(store, 4), "memcpy_ms": round(copy, 4),
                                           "memcpy_over_store": round(copy / store, 3)}
    cases.context.cache_clear()
print(sys.argv[1], json.dumps(row), flush=True)
