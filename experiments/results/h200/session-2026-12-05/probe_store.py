"""Where a small store's time goes on the GPU: the whole store (cases.extract, as experiments.hot_path times
it), BlockPool.write_many alone on the same writes, the in-place kernel alone on a plan made beforehand, a
synchronisation alone; then a cProfile of stores. Usage: python probe_store.py OUT_DIR"""
import cProfile
import io
import json
import pstats
import sys
import time

import semantic  # noqa: F401  (before mlx: picks the BLAS on CPU)
import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters.mlx_kernels import write_blocks_in_place
from semantic.benchmarking import cases
from semantic.domain import services


def timed(fn, repeat=200, warmup=10):
    samples = []
    for i in range(warmup + repeat):
        mx.synchronize()
        start = time.perf_counter()
        out = fn()
        mx.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        if hasattr(out, "release"):
            out.release()
    return [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]


def main(out_dir):
    results = {}
    profiles = []
    for geometry, blocks, layers in [("smollm2-135m", 1, 12), ("smollm2-135m", 4, 24), ("smollm2-135m", 8, 30),
                                     ("smollm2-135m", 16, 30)]:
        ctx = cases.context(geometry, blocks, layers, spare_blocks=blocks)
        pool = ctx.pool
        row = {"store": timed(lambda: cases.extract(ctx))}
        ids = pool.allocate(blocks * layers, "probe")
        writes = []
        for layer, cache in enumerate(ctx.caches):
            keys, values, first_token, offset = adapter.read_layer_cache(cache, whole_buffer=True)
            writes.append((ids[layer * blocks:(layer + 1) * blocks], 0, keys, values, first_token,
                           offset - first_token))
        row["write_many"] = timed(lambda: pool.write_many(writes))
        checked = [pool._checked_write(w) for w in writes]
        plan = services._pack_plan(checked, pool.spec.block_size)
        sources = [(w[2], w[3]) for w in checked]
        if cases.on_gpu():
            row["kernel"] = timed(lambda: write_blocks_in_place(pool._keys, pool._values, sources, plan,
                                                                pool.spec.block_size))
        row["plan"] = timed(lambda: services._pack_plan(checked, pool.spec.block_size))
        row["sync"] = timed(lambda: None)
        src = cases.device_copy_source(ctx.nbytes)
        row["device_copy"] = timed(lambda: mx.eval(cases.device_copy(src)))
        pool.release_blocks(ids, "probe")
        profile = cProfile.Profile()
        for _ in range(100):
            mx.synchronize()
            profile.enable()
            handle = cases.extract(ctx)
            mx.synchronize()
            profile.disable()
            handle.release()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
        profiles.append(f"==== {geometry} {blocks}x{layers}, 100 stores\n{text.getvalue()}")
        results[f"{blocks}x{layers}"] = row
        print(f"{blocks}x{layers}", row, flush=True)
    with open(f"{out_dir}/probe_store.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{out_dir}/probe_store_profile.txt", "w") as f:
        f.write("\n".join(profiles))


if __name__ == "__main__":
    main(sys.argv[1])
