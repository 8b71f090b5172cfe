"""The pool's q4 rebuild (``blocks_to_cache``, gemma3-12b-full 32x48) with the dequantizing kernel as shipped
(one output pair without the switch, 512 threads) against the kernel before it (the switch, 256 threads),
swapped into ``mlx_kernels``, alternated with the dense rebuild in ROUNDS rounds (p50 / p95 ms of REPEAT
synchronized calls after 5 warm-ups); both checked bit-exact against ``mx.dequantize`` of the same rows first.
Usage: q4_shipped_against_old.py OUT_DIR [ROUNDS] [REPEAT] [GEOMETRY BLOCKS LAYERS]"""
import json
import sys

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels
from semantic.benchmarking import cases

out_dir = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 60
case = (sys.argv[4], int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else ("gemma3-12b-full", 32, 48)
SHIPPED = (mlx_kernels._dequantize_rows_kernel, mlx_kernels._DEQUANTIZE_THREADS)


def old_kernel(n_outputs: int):
    return mx.fast.cuda_kernel(
        name=f"old_dequantize_rows_{n_outputs}",
        input_names=["k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases", "rows"],
        output_names=mlx_kernels._output_names(n_outputs),
        source=mlx_kernels._DEQUANTIZE_ROWS.replace("OUTPUT_SWITCH", mlx_kernels._output_switch(n_outputs, "T*")))


def use(which: str) -> None:
    kernel, threads = SHIPPED if which == "shipped" else (old_kernel, 256)
    mlx_kernels._dequantize_rows_kernel, mlx_kernels._DEQUANTIZE_THREADS = kernel, threads


dense = cases.context(*case)
q4 = cases.context(*case, 0, "q4")
arenas = q4.pool._quantized
tables, fmt = arenas._row_tables(), arenas.format
rows = q4.pool.gather_rows(q4.handle.all_block_ids).index.reshape(-1)
reference = [mx.dequantize(*(mx.take(t, rows, axis=0) for t in part), group_size=fmt.group_size, bits=fmt.bits)
             for part in (tables[:3], tables[3:])]
exact = {}
for which in ("shipped", "old"):
    use(which)
    keys, values = q4.pool.gather(rows=q4.pool.gather_rows(q4.handle.all_block_ids))
    exact[which] = bool(mx.array_equal(keys.reshape(-1), reference[0].reshape(-1)).item()
                        and mx.array_equal(values.reshape(-1), reference[1].reshape(-1)).item())
    del keys, values
del reference
print("bit-exact against mx.dequantize", exact, flush=True)


def p(fn):
    s = cases.time_samples(fn, repeat, warmup=5, sync=True)
    return [round(float(np.percentile(s, q)) * 1e3, 3) for q in (50, 95)]


out = {"exact": exact, "rounds": []}
for r in range(rounds):
    row = {}
    for which in (("shipped", "old") if r % 2 == 0 else ("old", "shipped")):
        row["dense_before_" + which] = p(lambda: cases.reconstruct(dense))
        use(which)
        row["q4_" + which] = p(lambda: cases.reconstruct(q4))
    use("shipped")
    ratios = {w: round(row["q4_" + w][0] / row["dense_before_" + w][0], 3) for w in ("shipped", "old")}
    row["q4_over_dense"] = ratios
    out["rounds"].append(row)
    print(json.dumps(row), flush=True)
    json.dump(out, open(f"{out_dir}/q4_shipped_against_old.json", "w"), indent=1)
