"""A whole store (cases.extract) on the GPU cut at its kernel launch: Python before the launch, the launch call,
what follows until the store returns (token checks, handle, the wait for the kernel), the timer's synchronize.
Medians over 300 stores (released outside the clock), per EXP-006 case up to 90 MiB. Usage: store_stages.py OUT"""
import json, sys, time
import mlx.core as mx
import numpy as np
import semantic  # noqa
from semantic.benchmarking import cases
from semantic.domain import services

marks = {}
launch = services.write_described_blocks_in_place


def marked(*args, **kwargs):
    marks["enter"] = time.perf_counter()
    out = launch(*args, **kwargs)
    marks["exit"] = time.perf_counter()
    return out


services.write_described_blocks_in_place = marked
results = {}
for case in cases.TARGET_CASES[:4]:
    ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
    parts = {k: [] for k in ("before_launch", "launch", "after_launch", "sync", "total")}
    for i in range(330):
        mx.synchronize()
        t0 = time.perf_counter()
        h = cases.extract(ctx)
        t1 = time.perf_counter()
        mx.synchronize()
        t2 = time.perf_counter()
        h.release()
        if i >= 30:
            parts["before_launch"].append(marks["enter"] - t0)
            parts["launch"].append(marks["exit"] - marks["enter"])
            parts["after_launch"].append(t1 - marks["exit"])
            parts["sync"].append(t2 - t1)
            parts["total"].append(t2 - t0)
    results[case.name] = {k: round(float(np.median(v)) * 1e6, 1) for k, v in parts.items()}
    print(case.name, results[case.name], flush=True)
    cases.context.cache_clear(); del ctx
json.dump(results, open(f"{sys.argv[1]}/store_stages.json", "w"), indent=1)
