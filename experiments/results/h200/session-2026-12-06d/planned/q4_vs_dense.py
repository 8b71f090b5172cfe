"""Issue 14's rebuild goal on this GPU: a q4 rebuild against a dense (bf16) rebuild of the same context,
32 blocks x 48 layers of gemma3-12b-full (3 GiB dense), with the device copy of the dense bytes; three
rounds alternating the sides, p50 / p95 ms of 40 synchronized calls after 5 warm-ups each (``blocks_to_cache``,
evaluated). Usage: q4_vs_dense.py OUT_JSON"""
import json
import sys

import numpy as np

from semantic.benchmarking import cases

SIDES = {"dense": cases.context("gemma3-12b-full", 32, 48), "q4": cases.context("gemma3-12b-full", 32, 48, 0, "q4")}
copy = cases.plain_copy(SIDES["dense"].nbytes)
rounds = []
for _ in range(3):
    row = {}
    for name, ctx in SIDES.items():
        samples = cases.time_samples(lambda: cases.reconstruct(ctx), 40, warmup=5, sync=True)
        row[name] = [round(float(np.percentile(samples, q)) * 1e3, 3) for q in (50, 95)]
    samples = cases.time_samples(copy, 40, warmup=5, sync=True)
    row["copy"] = [round(float(np.percentile(samples, q)) * 1e3, 3) for q in (50, 95)]
    row["q4_over_dense_p50"] = round(row["q4"][0] / row["dense"][0], 3)
    rounds.append(row)
    print(json.dumps(row), flush=True)
json.dump({"bytes_read": {name: ctx.handle.nbytes for name, ctx in SIDES.items()}, "rounds": rounds},
          open(sys.argv[1], "w"), indent=1)
