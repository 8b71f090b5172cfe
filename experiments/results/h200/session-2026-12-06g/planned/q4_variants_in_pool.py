"""The pool's own q4 rebuild (``blocks_to_cache``, gemma3-12b-full 32x48) with the shipped dequantizing kernel
and with variants of it swapped into ``mlx_kernels`` (same launch path, same grid, same arrays), alternated
with the dense rebuild and the 3 GiB copy in several rounds; each variant checked bit-exact against the shipped
kernel first. Variants: ``noswitch`` (one output pair without the output switch and its runtime division),
``constdims`` (a row's words and groups per token slot compile-time constants where keys and values have the
same, so a word's group is found with shifts, not runtime divisions), ``both``; each at 256 and 512 threads; and the dense gather's kernel without its output switch
(``dense_noswitch``). p50 / p95 ms of REPEAT synchronized calls after 5 warm-ups.
Usage: q4_variants_in_pool.py OUT_DIR [ROUNDS] [REPEAT]"""
import json
import sys
import time

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels
from semantic.benchmarking import cases

out_dir = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 40
SHIPPED = mlx_kernels._DEQUANTIZE_ROWS
NO_SWITCH = ("    T* out = is_value ? v_out0 : k_out0;\n"
             "    T* __restrict__ dst = out + (size_t)blockIdx.x * BLOCK_SIZE * words * PACK;")


def source(name: str, n_outputs: int) -> str:
    text = SHIPPED
    if name in ("constdims", "both"):
        for what, k, v in (("words", "K_WORDS", "V_WORDS"), ("groups", "K_GROUPS", "V_GROUPS")):
            old = f"const int {what} = is_value ? {v} : {k};"
            assert old in text
            text = text.replace(old, f"const int {what} = {k} == {v} ? {k} : (is_value ? {v} : {k});")
    if name in ("noswitch", "both") and n_outputs == 1:
        head, tail = text.split("    T* out = nullptr;\nOUTPUT_SWITCH\n")
        tail = tail.split("\n", 1)[1]  # drop the shipped dst line
        return head + NO_SWITCH + "\n" + tail
    return text.replace("OUTPUT_SWITCH", mlx_kernels._output_switch(n_outputs, "T*"))


def use(name: str, threads: int) -> None:
    def kernel(n_outputs: int):
        return mx.fast.cuda_kernel(
            name=f"probe_{name}_{n_outputs}",
            input_names=["k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases", "rows"],
            output_names=mlx_kernels._output_names(n_outputs), source=source(name, n_outputs))
    mlx_kernels._dequantize_rows_kernel = kernel
    mlx_kernels._THREADS = threads


SHIPPED_ROW_KERNEL = mlx_kernels._row_pair_kernel


def row_kernel_without_switch(n_outputs: int):
    """The dense gather's kernel; for one output pair without the output switch."""
    if n_outputs != 1:
        return SHIPPED_ROW_KERNEL(n_outputs)
    head, tail = mlx_kernels._ROW_PAIR_COPY.split("    void* out = nullptr;\nOUTPUT_SWITCH\n")
    tail = tail.split("\n", 1)[1]
    source = head + ("    uint4* dst = reinterpret_cast<uint4*>(is_value ? (void*)v_out0 : (void*)k_out0)"
                     " + (size_t)blockIdx.x * vecs;\n") + tail
    return mx.fast.cuda_kernel(name="probe_row_pair_noswitch_1", input_names=["k_table", "v_table", "rows"],
                               output_names=mlx_kernels._output_names(1), source=source)


dense = cases.context("gemma3-12b-full", 32, 48)
q4 = cases.context("gemma3-12b-full", 32, 48, 0, "q4")
copy = cases.plain_copy(dense.nbytes)
variants = [(n, t) for n in ("shipped", "noswitch", "constdims", "both") for t in (256, 512)]
use("shipped", 256)
reference = [(c.keys, c.values) for c in cases.reconstruct(q4)]
mx.eval(reference)
exact = {}
for name, threads in variants:
    use(name, threads)
    got = [(c.keys, c.values) for c in cases.reconstruct(q4)]
    exact[f"{name}_{threads}"] = all(bool(mx.array_equal(a, b).item()) for pa, pb in zip(got, reference)
                                     for a, b in zip(pa, pb))
use("shipped", 256)
dense_reference = [(c.keys, c.values) for c in cases.reconstruct(dense)]
mlx_kernels._row_pair_kernel = row_kernel_without_switch
got = [(c.keys, c.values) for c in cases.reconstruct(dense)]
mlx_kernels._row_pair_kernel = SHIPPED_ROW_KERNEL
exact["dense_noswitch"] = all(bool(mx.array_equal(a, b).item()) for pa, pb in zip(got, dense_reference)
                              for a, b in zip(pa, pb))
del reference, got, dense_reference
print("bit-exact", exact, flush=True)


def p(fn):
    s = cases.time_samples(fn, repeat, warmup=5, sync=True)
    return [round(float(np.percentile(s, q)) * 1e3, 3) for q in (50, 95)]


out = {"exact": exact, "rounds": []}
start = time.time()
for r in range(rounds):
    row = {}
    order = variants if r % 2 == 0 else variants[::-1]
    use("shipped", 256)
    row["dense"] = p(lambda: cases.reconstruct(dense))
    row["copy"] = p(copy)
    for name, threads in order:
        use(name, threads)
        row[f"{name}_{threads}"] = p(lambda: cases.reconstruct(q4))
    use("shipped", 256)
    mlx_kernels._row_pair_kernel = row_kernel_without_switch
    row["dense_noswitch"] = p(lambda: cases.reconstruct(dense))
    mlx_kernels._row_pair_kernel = SHIPPED_ROW_KERNEL
    row["dense_again"] = p(lambda: cases.reconstruct(dense))
    out["rounds"].append(row)
    base = (row["dense"][0] + row["dense_again"][0]) / 2
    print(json.dumps(row), {k: round(v[0] / base, 3) for k, v in row.items()}, f"t={time.time() - start:.0f}",
          flush=True)
    json.dump(out, open(f"{out_dir}/q4_variants_in_pool.json", "w"), indent=1)
