"""Whether the slow synchronisations after a store (157-189 us instead of 20-40, in some rounds of
store_stages.py at 8x30 and 16x30) are the store's or the device's: 8x30 and 16x30 stores interleaved one
by one with the device copy of the same bytes, each timed as (call, synchronize) with mx.synchronize()
before; 600 of each after 50 warm-ups. Prints per case and side the median call and synchronize (us), the
share of synchronizes over 100 us, and in which hundred of the samples those fall.
Usage: PYTHONPATH=<tree> python slow_sync.py OUT.json"""
import semantic  # noqa: F401  (loads OpenBLAS before MLX, on CPU)
import json
import sys
import time

import mlx.core as mx
import numpy as np

from semantic.benchmarking import cases

results = {}
for case in cases.TARGET_CASES[2:4]:
    ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
    copy = cases.plain_copy(ctx.nbytes)
    sides = {"store": [], "copy": []}
    for i in range(650):
        for side in ("store", "copy"):
            mx.synchronize()
            t0 = time.perf_counter()
            out = cases.extract(ctx) if side == "store" else copy()
            if side == "copy" and out is not None:
                mx.eval(out)
            t1 = time.perf_counter()
            mx.synchronize()
            t2 = time.perf_counter()
            if side == "store":
                out.release()
            del out
            if i >= 50:
                sides[side].append((t1 - t0, t2 - t1))
    row = {}
    for side, samples in sides.items():
        call = np.array([s[0] for s in samples]) * 1e6
        sync = np.array([s[1] for s in samples]) * 1e6
        slow = np.nonzero(sync > 100)[0]
        row[side] = {"call_p50": round(float(np.median(call)), 1), "sync_p50": round(float(np.median(sync)), 1),
                     "sync_p95": round(float(np.percentile(sync, 95)), 1),
                     "slow_share": round(len(slow) / len(sync), 3),
                     "slow_per_hundred": np.bincount(slow // 100, minlength=6).tolist()}
    results[case.name] = row
    print(case.name, json.dumps(row), flush=True)
    cases.context.cache_clear()
    del ctx
json.dump(results, open(sys.argv[1], "w"), indent=1)
