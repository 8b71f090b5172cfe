"""q4 / dense `blocks_to_cache` of gemma3-12b-full 32x48 (3 GiB dense) with the shipped kernels, in ROUNDS
alternated rounds (dense, q4, dense, copy), p50 / p95 ms of REPEAT synchronized calls after 5 warm-ups each.
Usage: q4_over_dense.py OUT_JSON [ROUNDS] [REPEAT]"""
import json
import statistics
import sys

from semantic.benchmarking import cases

out, rounds, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dense = cases.context("gemma3-12b-full", 32, 48)
q4 = cases.context("gemma3-12b-full", 32, 48, 0, "q4")
copy = cases.plain_copy(dense.nbytes)


def timed(fn):
    samples = sorted(cases.time_samples(fn, repeat + 5, sync=True)[5:])
    return {"p50_ms": 1e3 * statistics.median(samples), "p95_ms": 1e3 * samples[int(0.95 * (len(samples) - 1))]}


results = []
for r in range(rounds):
    row = {"dense_before": timed(lambda: cases.reconstruct(dense)), "q4": timed(lambda: cases.reconstruct(q4)),
           "dense_after": timed(lambda: cases.reconstruct(dense)), "copy": timed(copy)}
    row["q4_over_dense"] = row["q4"]["p50_ms"] / ((row["dense_before"]["p50_ms"] + row["dense_after"]["p50_ms"]) / 2)
    results.append(row)
    print(r, {k: (v if isinstance(v, float) else round(v["p50_ms"], 3)) for k, v in row.items()}, flush=True)
json.dump({"rounds": results, "q4_bytes": q4.nbytes, "dense_bytes": dense.nbytes}, open(out, "w"), indent=1)
