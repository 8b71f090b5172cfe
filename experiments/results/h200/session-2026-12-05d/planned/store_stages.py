"""A whole store (cases.extract) on the GPU cut at its kernel launch: Python before the launch, the launch call,
what follows until the store returns (token checks, handle, the wait for the kernel), the timer's synchronize.
Medians over 300 stores (released outside the clock), per EXP-006 case up to 90 MiB. Usage: store_stages.py OUT_JSON"""
import json, sys, time
import mlx.core as mx
import numpy as np
import semantic  # noqa
from semantic.benchmarking import cases
from semantic.adapters import mlx_kernels as kernels
from semantic.domain import services

marks = {}


def marked(owner, name, enter, leave):
    """``owner.name`` wrapped to stamp ``marks[enter]`` and ``marks[leave]`` around each call."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        marks[enter] = time.perf_counter()
        out = original(*args, **kwargs)
        marks[leave] = time.perf_counter()
        return out
    setattr(owner, name, wrapper)


marked(kernels, "_pack_launch", "node", "node_done")  # the kernel call, inside the launch
marked(services, "write_described_blocks_in_place", "enter", "exit")  # the launch
results = {}
for case in cases.TARGET_CASES[:4]:
    ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
    parts = {k: [] for k in ("before_launch", "launch", "launch_kernel_call", "launch_async_eval", "after_launch", "sync", "total")}
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
            parts["launch_kernel_call"].append(marks["node_done"] - marks["node"])
            parts["launch_async_eval"].append(marks["exit"] - marks["node_done"])
            parts["sync"].append(t2 - t1)
            parts["total"].append(t2 - t0)
    results[case.name] = {k: round(float(np.median(v)) * 1e6, 1) for k, v in parts.items()}
    print(case.name, results[case.name], flush=True)
    cases.context.cache_clear(); del ctx
json.dump(results, open(sys.argv[1], "w"), indent=1)
