"""Where copy threads pay: CPU stores (p50 ms of 300 after 30, three rounds) on one thread against two
threads forced on whatever the size (``split_host_copies``' thresholds set to 0), smollm2-135m geometry.

    PYTHONPATH=$PWD python experiments/results/cpu-store-threads/threshold_sweep.py
"""
import semantic  # noqa: F401  (first: it loads OpenBLAS before MLX)
from experiments.stats import summarize
from semantic.adapters import mlx_kernels
from semantic.benchmarking import cases


def p50(fn):
    return round(summarize(cases.time_samples(fn, 300, warmup=30))["p50"] * 1e3, 4)


for blocks, layers in [(1, 12), (1, 24), (2, 16), (2, 24), (2, 30), (3, 12), (4, 12), (3, 24), (4, 24)]:
    ctx = cases.context("smollm2-135m", blocks, layers, blocks)
    src, dst = cases.memcpy_source(ctx.nbytes)
    rounds = []
    for _ in range(3):
        mlx_kernels._HOST_COPY_THREADS = 1
        one = p50(lambda: cases.extract(ctx))
        mlx_kernels._HOST_COPY_THREADS = 2
        mlx_kernels._PARALLEL_COPY_BYTES = mlx_kernels._PARALLEL_ITEM_BYTES = 0
        two = p50(lambda: cases.extract(ctx))
        rounds.append((one, two))
    per_layer_kib = blocks * ctx.pool.block_bytes // 1024
    print(f"{blocks}x{layers}: {ctx.nbytes / 2**20:.2f} MiB, {per_layer_kib} KiB per layer, memcpy "
          f"{p50(lambda: cases.memcpy(src, dst))} ms; store on one / two threads: {rounds}", flush=True)
