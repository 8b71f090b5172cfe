"""A store (cases.extract) and a rebuild as experiments.hot_path times them (cases.time_samples, synchronised,
10 warm-up + 200 calls), for whichever tree PYTHONPATH names. Usage: ab_store.py LABEL OUT_JSON"""
import json
import sys

import semantic
import numpy as np

from semantic.benchmarking import cases

out = {"tree": semantic.__file__}
for blocks, layers in [(1, 12), (4, 24), (8, 30), (16, 30)]:
    ctx = cases.context("smollm2-135m", blocks, layers, blocks)
    row = {}
    for name, fn in [("store", lambda: cases.extract(ctx)), ("rebuild", lambda: cases.reconstruct(ctx))]:
        samples = cases.time_samples(fn, 200, warmup=10, sync=cases.on_gpu())
        row[name] = [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]
    out[f"{blocks}x{layers}"] = row
    cases.context.cache_clear()
print(sys.argv[1], json.dumps(out), flush=True)
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
