"""Where a store's time goes on the GPU, stage by stage (wrappers with perf_counter around the store's parts,
the device synchronised before each store), and the in-place kernel's call in variants. Usage: stages.py OUT"""
import gc
import json
import sys
import time
from collections import defaultdict

import semantic  # noqa: F401
import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels as kernels
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.benchmarking import cases
from semantic.domain import services

spent = defaultdict(float)


def wrap(owner, name, label):
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    setattr(owner, name, timed)
    return original


def pct(samples):
    return [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]


def timed(fn, repeat=200, warmup=10, after=None):
    samples = []
    for i in range(warmup + repeat):
        mx.synchronize()
        start = time.perf_counter()
        out = fn()
        mx.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
        if after is not None:
            after(out)
        del out  # freed outside the clock, as cases.time_samples does
    return pct(samples)


def launch(kernel_fn, sources, plan_array, n_rows, block_size, extra):
    keys, values = sources[0]
    heads = keys.shape[1]
    return kernel_fn(
        inputs=[k for k, _ in sources] + [v for _, v in sources] + [plan_array, *extra],
        template=[("T", kernels._SAME_SIZE_UINT[keys.itemsize]), ("HEADS", heads), ("BLOCK_SIZE", block_size),
                  ("K_DIM", keys.shape[-1]), ("V_DIM", values.shape[-1])],
        grid=(n_rows * heads * kernels._THREADS, 2, 1), threadgroup=(kernels._THREADS, 1, 1),
        output_shapes=[(1,)], output_dtypes=[mx.uint8])


def main(out_dir):
    results = {}
    for blocks, layers in [(1, 12), (4, 24), (8, 30), (16, 30)]:
        ctx = cases.context("smollm2-135m", blocks, layers, spare_blocks=blocks)
        pool, size = ctx.pool, ctx.pool.spec.block_size
        row = {}
        for gc_on in (True, False, True, False):
            (gc.enable if gc_on else gc.disable)()
            suffix = "" if gc_on else "_gc_off"
            row.setdefault("store" + suffix, []).append(timed(lambda: cases.extract(ctx), after=lambda h: h.release()))
            row.setdefault("rebuild" + suffix, []).append(timed(lambda: mx.eval([(c.keys, c.values) for c in cases.reconstruct(ctx)])))
        gc.enable()
        # stages
        originals = [(services.BlockPool, "write_many", wrap(services.BlockPool, "write_many", "write_many")),
                     (services, "write_blocks_in_place", wrap(services, "write_blocks_in_place", "kernel_call")),
                     (services, "_pack_plan", wrap(services, "_pack_plan", "pack_plan")),
                     (services._HandleBuilder, "finish", wrap(services._HandleBuilder, "finish", "finish")),
                     (services._HandleBuilder, "allocate", wrap(services._HandleBuilder, "allocate", "allocate")),
                     (kernels, "_pack_launch", wrap(kernels, "_pack_launch", "pack_launch"))]
        spent.clear()
        n, total = 200, 0.0
        for _ in range(n):
            mx.synchronize()
            start = time.perf_counter()
            handle = cases.extract(ctx)
            mx.synchronize()
            total += time.perf_counter() - start
            t = time.perf_counter()
            handle.release()
            spent["release"] += time.perf_counter() - t
        for owner, name, original in originals:
            setattr(owner, name, original)
        row["stages_us"] = {k: round(v / n * 1e6, 1) for k, v in spent.items()}
        row["stages_us"]["store_total"] = round(total / n * 1e6, 1)
        # kernel variants on one prepared write
        ids = pool.allocate(blocks * layers, "probe")
        writes = []
        for layer, cache in enumerate(ctx.caches):
            keys, values, first_token, offset = adapter.read_layer_cache(cache, whole_buffer=True)
            writes.append((ids[layer * blocks:(layer + 1) * blocks], 0, keys, values, first_token, offset - first_token))
        checked = [pool._checked_write(w) for w in writes]
        plan = services._pack_plan(checked, size)
        sources = [(w[2], w[3]) for w in checked]
        kernel_fn = kernels._write_in_place_kernel(len(sources))
        extra = [pool._keys, pool._values]
        plan_mx = mx.array(plan, dtype=mx.int32)
        mx.eval(plan_mx)
        row["kernel_shipped"] = timed(lambda: kernels.write_blocks_in_place(pool._keys, pool._values, sources, plan, size))
        row["kernel_premade_plan_eval"] = timed(lambda: mx.eval(launch(kernel_fn, sources, plan_mx, len(plan), size, extra)))
        row["kernel_premade_plan_async"] = timed(lambda: mx.async_eval(launch(kernel_fn, sources, plan_mx, len(plan), size, extra)))
        row["kernel_fresh_plan_async"] = timed(lambda: mx.async_eval(launch(kernel_fn, sources, mx.array(plan, dtype=mx.int32), len(plan), size, extra)))
        row["plan_array_eval"] = timed(lambda: mx.eval(mx.array(plan, dtype=mx.int32)))
        row["graph_only_no_eval"] = timed(lambda: launch(kernel_fn, sources, plan_mx, len(plan), size, extra))
        row["sync"] = timed(lambda: None)
        src = cases.device_copy_source(ctx.nbytes)
        row["device_copy"] = timed(lambda: mx.eval(cases.device_copy(src)))
        pool.release_blocks(ids, "probe")
        results[f"{blocks}x{layers}"] = row
        print(f"{blocks}x{layers}", json.dumps(row), flush=True)
    with open(f"{out_dir}/stages.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
