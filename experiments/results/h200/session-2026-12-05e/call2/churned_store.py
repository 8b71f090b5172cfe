"""Stores on a pool that agents have come and gone in, against the same stores on a fresh pool, for whichever
tree PYTHONPATH names: the free blocks as a stack (`04ec98f`) or as runs handed out best fit (`a52d54d`).
Per EXP-006 case up to 90 MiB: a context in a pool with room for 8 more, churned by 3,000 seeded allocations
and releases of one to eight contexts' worth of blocks (a third of them kept), then 300 stores
(`cases.extract`, synchronised, each released outside the clock): p50 / p95 ms, and the share of stores
whose blocks were one run (the CUDA store's path without a plan array).
Usage: PYTHONPATH=<tree> python churned_store.py OUT_JSON"""
import json
import random
import sys
import time

import semantic  # noqa: F401
import mlx.core as mx
import numpy as np

from semantic.benchmarking import cases


def one_run(handle):
    ids = [b for layer in handle.all_block_ids for b in layer]
    return ids == list(range(ids[0], ids[0] + len(ids)))


def stores(ctx, repeat=300, warmup=20):
    samples, runs = [], 0
    for i in range(warmup + repeat):
        mx.synchronize()
        start = time.perf_counter()
        handle = cases.extract(ctx)
        mx.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
            runs += one_run(handle)
        handle.release()
    return {"p50_ms": float(np.percentile(samples, 50)) * 1e3, "p95_ms": float(np.percentile(samples, 95)) * 1e3,
            "one_run": runs / repeat}


results = {"tree": semantic.__file__}
for case in cases.TARGET_CASES[:4]:
    ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=8 * case.blocks)
    per_context = case.blocks * case.layers
    row = {"fresh": stores(ctx)}
    rng, held = random.Random(0), []
    for _ in range(3000):
        if held and (rng.random() < 0.5 or ctx.pool.free_blocks < 3 * per_context):
            ctx.pool.release_blocks(held.pop(rng.randrange(len(held))), "churn")
        else:
            n = rng.randint(1, 8 * per_context // 3)
            if n <= ctx.pool.free_blocks - 2 * per_context:
                held.append(ctx.pool.allocate(n, "churn"))
    row["churned"] = stores(ctx)
    for ids in held:
        ctx.pool.release_blocks(ids, "churn")
    results[case.name] = row
    print(case.name, json.dumps(row), flush=True)
    cases.context.cache_clear()
json.dump(results, open(sys.argv[1], "w"), indent=1)
