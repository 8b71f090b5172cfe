"""A loop for ``py-spy record --native --idle --pid`` (attached once it prints "ready"): where a store's (or the device copy's) host time goes, down
to MLX's C++ and the CUDA driver. Each iteration: synchronize, the timed call, synchronize; a store's handle
is released after the second synchronize (as hot_path's timer does). Prints the loop's p50 per iteration.

Usage: store_profile.py store|copy|rebuild BLOCKS LAYERS SECONDS"""
import sys
import time

import semantic  # noqa: F401  (loads OpenBLAS before MLX on CPU)

import mlx.core as mx
import numpy as np

from semantic.benchmarking import cases

what, blocks, layers, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ctx = cases.context("smollm2-135m", blocks, layers, blocks)
copy = cases.plain_copy(ctx.nbytes)


def once():
    if what == "store":
        return cases.extract(ctx)
    if what == "copy":
        out = copy()
        mx.eval(out)
        return out
    out = cases.reconstruct(ctx)
    mx.eval([c.state[:2] for c in out])
    return out


for _ in range(50):
    out = once()
    mx.synchronize()
    if what == "store":
        out.release()


def timed_loop():
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        mx.synchronize()
        t0 = time.perf_counter()
        out = once()
        mx.synchronize()
        samples.append(time.perf_counter() - t0)
        if what == "store":
            out.release()
        del out
    return samples


print('ready', flush=True)
samples = timed_loop()
print(f"{what} {blocks}x{layers}: {len(samples)} calls, p50 {np.median(samples) * 1e3:.3f} ms, "
      f"p95 {np.percentile(samples, 95) * 1e3:.3f} ms", flush=True)
