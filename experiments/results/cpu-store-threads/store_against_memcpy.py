"""CPU stores (``cache_to_blocks`` of a context into fresh blocks, as ``experiments.hot_path`` times them:
the handle's release outside the clock) against memcpy of the same bytes, for EXP-006's smollm2 cases:
p50 / p95 ms of 300 calls after 30, memcpy before and after each store (the faster p50 of the two is the
ratio's baseline). One JSON line per case.

    PYTHONPATH=<tree> python experiments/results/cpu-store-threads/store_against_memcpy.py [label]
"""
import json
import sys

import semantic  # noqa: F401  (first: it loads OpenBLAS before MLX)
from experiments.stats import summarize
from semantic.benchmarking import cases


def p50_p95(fn):
    summary = summarize(cases.time_samples(fn, 300, warmup=30))
    return round(summary["p50"] * 1e3, 4), round(summary["p95"] * 1e3, 4)


label = sys.argv[1] if len(sys.argv) > 1 else ""
for blocks, layers in [(1, 12), (4, 24), (8, 30), (16, 30)]:
    ctx = cases.context("smollm2-135m", blocks, layers, blocks)
    src, dst = cases.memcpy_source(ctx.nbytes)
    before = p50_p95(lambda: cases.memcpy(src, dst))
    store = p50_p95(lambda: cases.extract(ctx))
    after = p50_p95(lambda: cases.memcpy(src, dst))
    print(json.dumps({"tree": label, "case": f"{blocks}x{layers}", "mib": ctx.nbytes / 2**20, "store": store,
                      "memcpy": [before, after], "memcpy_over_store": round(min(before[0], after[0]) / store[0], 3)}),
          flush=True)
