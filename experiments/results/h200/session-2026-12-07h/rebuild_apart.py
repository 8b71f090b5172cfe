"""Whether a rebuild without room (``blocks_to_cache`` as the EXP-006 cases call it) is faster on CUDA with each
layer in a buffer of its own from the one kernel (``BlockPool.gather_apart``, what the engine's rebuilds with
room get) than as views of one gather split per layer: the split's views cost MLX graph work per layer (this
session's first call, ``stages.log``: gather + split 0.07-0.2 ms over the gather alone at 4x24-16x30).
Alternates, in ROUNDS rounds, per case: the shipped rebuild, the same with every full-attention group gathered
apart, and the device copy of the same bytes (dense bytes for the q4 case); p50 / p95 ms of REPEAT synchronized calls after 10 warm-ups.
Checks once per case that both rebuilds give the same arrays.

    python experiments/results/h200/session-2026-12-07h/rebuild_apart.py OUT_JSON [ROUNDS] [REPEAT]
"""
import json
import sys

from semantic.application import block_cache  # first: semantic loads OpenBLAS before MLX
from semantic.benchmarking import cases

import mlx.core as mx  # noqa: E402

from experiments.gpu_kernel_choices import percentiles  # noqa: E402

out, rounds, repeat = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3, \
    int(sys.argv[3]) if len(sys.argv) > 3 else 100
points = {"4x24": ("smollm2-135m", 4, 24), "8x30": ("smollm2-135m", 8, 30), "16x30": ("smollm2-135m", 16, 30),
          "32x48": ("gemma3-12b-full", 32, 48), "32x48-q4": ("gemma3-12b-full", 32, 48, 0, "q4")}
shipped = block_cache._gathered_layers


def apart(pool, group, apart):
    return shipped(pool, group, group.window is None)


def rebuild_apart(ctx):
    block_cache._gathered_layers = apart
    try:
        return cases.reconstruct(ctx)
    finally:
        block_cache._gathered_layers = shipped


contexts = {name: cases.context(*point) for name, point in points.items()}
for name, ctx in contexts.items():
    a, b = cases.reconstruct(ctx), rebuild_apart(ctx)
    same = all(mx.array_equal(x.keys, y.keys).item() and mx.array_equal(x.values, y.values).item()
               for x, y in zip(a, b))
    print(name, "same arrays:", same, flush=True)
    del a, b
timed = {name: {"rebuild": lambda ctx=ctx: cases.reconstruct(ctx), "rebuild_apart": lambda ctx=ctx: rebuild_apart(ctx),
                "device_copy": cases.plain_copy(contexts[name.split("-")[0]].nbytes)}
         for name, ctx in contexts.items()}
record = {"rounds": []}
for r in range(rounds):
    row = {name: {stage: percentiles(fn, repeat, 10) for stage, fn in parts.items()} for name, parts in timed.items()}
    record["rounds"].append(row)
    print(r, json.dumps(row), flush=True)
json.dump(record, open(out, "w"), indent=1)
