"""Where a q4 rebuild's time goes beyond its kernel (issue 14's rebuild goal), gemma3-12b-full 32x48:
the dequantizing kernel called directly, then each layer of the code above it (``QuantizedArenas.gather``,
``BlockPool.gather``, ``blocks_to_cache``), the dense path's same layers, and the device copy of the dense
bytes; three rounds alternating them, p50 / p95 ms of 40 synchronized calls after 5 warm-ups. Then cProfile
of 20 synchronized rebuilds of each format. Usage: q4_parts.py OUT_DIR [GEOMETRY BLOCKS LAYERS]"""
import cProfile
import io
import json
import pstats
import sys

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels
from semantic.benchmarking import cases

out_dir = sys.argv[1]
case = (sys.argv[2], int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 2 else ("gemma3-12b-full", 32, 48)
dense = cases.context(*case)
q4 = cases.context(*case, 0, "q4")
copy = cases.plain_copy(dense.nbytes)
q_rows = q4.pool.gather_rows(q4.handle.all_block_ids)
d_rows = dense.pool.gather_rows(dense.handle.all_block_ids)
arenas = q4.pool._quantized
fmt = arenas.format
tables = arenas._row_tables()
spec = dense.spec
d_tables = (dense.pool._keys.reshape(-1, spec.block_size, spec.k_head_dim),
            dense.pool._values.reshape(-1, spec.block_size, spec.v_head_dim))
print("arena shapes", [a.shape for a in arenas.arenas], "dtypes", [a.dtype for a in arenas.arenas], flush=True)

def evaluated(fn):
    return lambda: mx.eval(fn())


STEPS = {
    "q4_kernel": evaluated(lambda: mlx_kernels.gather_dequantized_pairs(tuple(tables[:3]), tuple(tables[3:]), q_rows.index,
                                                              group_size=fmt.group_size, bits=fmt.bits)),
    "q4_arenas_gather": evaluated(lambda: arenas.gather(q_rows.index)),
    "q4_pool_gather": evaluated(lambda: q4.pool.gather(rows=q_rows)),
    "q4_rebuild": lambda: cases.reconstruct(q4),
    "dense_kernel": evaluated(lambda: mlx_kernels.gather_row_pairs(*d_tables, d_rows.index)),
    "dense_pool_gather": evaluated(lambda: dense.pool.gather(rows=d_rows)),
    "dense_rebuild": lambda: cases.reconstruct(dense),
    "copy": copy,
}
rounds = []
for _ in range(3):
    row = {}
    for name, fn in STEPS.items():
        samples = cases.time_samples(fn, 40, warmup=5, sync=True)
        row[name] = [round(float(np.percentile(samples, q)) * 1e3, 3) for q in (50, 95)]
    row["q4_over_dense_rebuild"] = round(row["q4_rebuild"][0] / row["dense_rebuild"][0], 3)
    row["q4_over_dense_kernel"] = round(row["q4_kernel"][0] / row["dense_kernel"][0], 3)
    rounds.append(row)
    print(json.dumps(row), flush=True)

profiles = {}
for name, ctx in (("q4", q4), ("dense", dense)):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        mx.synchronize()
        caches = cases.reconstruct(ctx)
        mx.synchronize()
        del caches
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    profiles[name] = text.getvalue()
    print(f"== {name}\n{text.getvalue()[-3500:]}", flush=True)
json.dump({"rounds": rounds, "profiles": profiles}, open(f"{out_dir}/q4_parts.json", "w"), indent=1)
