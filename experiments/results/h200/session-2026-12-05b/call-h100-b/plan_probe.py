"""Ways to hand a store's plan to the in-place write kernel, on CUDA: the shipped fresh mx.array per store, a
plan made once (a bound, not usable), one array rewritten through NumPy, and no plan array at all (the few
numbers per layout carried in the strides of a one-element view, passed by value in the launch). Checks each
variant writes the same pool bytes. Usage: plan_probe.py OUT"""
import json
import sys
import time

import semantic  # noqa: F401
import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels as kernels
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.benchmarking import cases
from semantic.domain import services

DESC_SOURCE = """
    const int row = blockIdx.x;
    const int block = row / HEADS, head = row % HEADS;
    int source = 0, start = 0;
    for (;;) {
        const int nb = (int)desc_strides[4 + 4 * layouts[source]];
        if (block < start + nb) break;
        start += nb;
        ++source;
    }
    const int layout = layouts[source];
    const int first_index = (int)desc_strides[1 + 4 * layout], first_token = (int)desc_strides[2 + 4 * layout];
    const int n_tokens = (int)desc_strides[3 + 4 * layout];
    const int tok0 = (first_index + block - start) * BLOCK_SIZE - first_token;
    const int lo = tok0 < 0 ? -tok0 : 0;
    const int hi = n_tokens - tok0 < BLOCK_SIZE ? n_tokens - tok0 : BLOCK_SIZE;
    const int64_t block_id = desc_strides[0] + block;
    const bool is_value = blockIdx.y == 1;
    const int dim = is_value ? V_DIM : K_DIM;
    const T* src = nullptr;
    int64_t head_stride = 0, token_stride = 0, dim_stride = 0;
    switch (source) {
SOURCE_CASES
    }
    src += head * head_stride;
    T* out = const_cast<T*>(reinterpret_cast<const T*>(is_value ? v_pool : k_pool)) + ((size_t)block_id * HEADS + head) * BLOCK_SIZE * dim;
    constexpr int PER_VEC = 16 / sizeof(T);
    const bool vectors = dim_stride == 1
        && ((reinterpret_cast<uintptr_t>(src) | (uintptr_t)(token_stride * sizeof(T))) % 16) == 0;
    if (vectors) {
        const int vecs = dim / PER_VEC;
        uint4* dst = reinterpret_cast<uint4*>(out);
        for (int i = threadIdx.x; i < BLOCK_SIZE * vecs; i += blockDim.x) {
            const int slot = i / vecs;
            dst[i] = (slot >= lo && slot < hi)
                ? reinterpret_cast<const uint4*>(src + (int64_t)(tok0 + slot) * token_stride)[i % vecs]
                : make_uint4(0, 0, 0, 0);
        }
    } else {
        for (int i = threadIdx.x; i < BLOCK_SIZE * dim; i += blockDim.x) {
            const int slot = i / dim;
            out[i] = (slot >= lo && slot < hi) ? src[(int64_t)(tok0 + slot) * token_stride + (i % dim) * dim_stride] : T(0);
        }
    }
"""


UNROLLED = """
    if (vectors) {
        const int vecs = dim / PER_VEC;
        const int total = BLOCK_SIZE * vecs;
        uint4* dst = reinterpret_cast<uint4*>(out);
        for (int base = threadIdx.x; base < total; base += blockDim.x * UNROLL) {
            uint4 v[UNROLL];
            #pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = base + u * blockDim.x;
                const int slot = i / vecs;
                v[u] = (i < total && slot >= lo && slot < hi)
                    ? reinterpret_cast<const uint4*>(src + (int64_t)(tok0 + slot) * token_stride)[i % vecs]
                    : make_uint4(0, 0, 0, 0);
            }
            #pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int i = base + u * blockDim.x;
                if (i < total) dst[i] = v[u];
            }
        }
    } else {"""


def desc_kernel(n, unrolled=False):
    cases_src = kernels._pack_source(n, "X").split("switch (source) {")[1].split("    }\n    src += head")[0]
    source = DESC_SOURCE.replace("SOURCE_CASES", cases_src.strip("\n"))
    if unrolled:
        head, tail = source.split("    if (vectors) {", 1)
        source = head + UNROLLED + tail.split("    } else {", 1)[1]
    return mx.fast.cuda_kernel(name=f"probe_desc_write_{n}{'_unrolled' if unrolled else ''}",
                               input_names=[*kernels._source_names(n), "layouts", "desc", "k_pool", "v_pool"],
                               output_names=["done"], source=source, ensure_row_contiguous=False)


def timed(fn, repeat=300, warmup=20):
    samples = []
    for i in range(warmup + repeat):
        mx.synchronize()
        start = time.perf_counter()
        fn()
        mx.synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]


def main(out_dir):
    results = {}
    zero = mx.zeros((1,), mx.int32)
    mx.eval(zero)
    for blocks, layers in [(1, 12), (4, 24), (8, 30), (16, 30)]:
        ctx = cases.context("smollm2-135m", blocks, layers, spare_blocks=blocks)
        pool, size = ctx.pool, ctx.pool.spec.block_size
        ids = pool.allocate(blocks * layers, "probe")
        assert ids == list(range(ids[0], ids[0] + len(ids))), "not consecutive"
        writes = []
        for layer, cache in enumerate(ctx.caches):
            keys, values, first_token, offset = adapter.read_layer_cache(cache, whole_buffer=True)
            writes.append((ids[layer * blocks:(layer + 1) * blocks], 0, keys, values, first_token, offset - first_token))
        checked = [pool._checked_write(w) for w in writes]
        plan = services._pack_plan(checked, size)
        sources = [(w[2], w[3]) for w in checked]
        heads = sources[0][0].shape[1]
        template = [("T", kernels._SAME_SIZE_UINT[sources[0][0].itemsize]), ("HEADS", heads), ("BLOCK_SIZE", size),
                    ("K_DIM", sources[0][0].shape[-1]), ("V_DIM", sources[0][1].shape[-1])]
        shipped = kernels._write_in_place_kernel(len(sources))
        dk = desc_kernel(len(sources))
        dku = desc_kernel(len(sources), unrolled=True)
        srcs = [k for k, _ in sources] + [v for _, v in sources]
        grid = (len(plan) * heads * kernels._THREADS, 2, 1)

        described = services._described_writes(checked, ids)

        def shipped_described():
            mx.eval(kernels.write_described_blocks_in_place(pool._keys, pool._values, sources, ids[0], *described, size))

        def launch(plan_array):
            (done,) = shipped(inputs=[*srcs, plan_array, pool._keys, pool._values], template=template, grid=grid,
                              threadgroup=(kernels._THREADS, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.uint8])
            mx.eval(done)

        layouts = mx.array([0] * len(sources), dtype=mx.int32)
        mx.eval(layouts)
        w0 = checked[0]

        def launch_desc(verbose=False, kernel=dk, extra=()):
            desc = mx.as_strided(zero, (1,) * 5, (ids[0], w0[1], w0[4], w0[5], len(w0[0])))
            (done,) = kernel(inputs=[*srcs, layouts, desc, pool._keys, pool._values], template=template + list(extra), grid=grid,
                         threadgroup=(kernels._THREADS, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.uint8],
                         verbose=verbose)
            mx.eval(done)

        def snapshot():
            return np.array(pool._keys[ids[0]:ids[-1] + 1].view(mx.uint16)), np.array(pool._values[ids[0]:ids[-1] + 1].view(mx.uint16))

        def scrub():
            pool._keys[ids[0]:ids[-1] + 1] = 7
            pool._values[ids[0]:ids[-1] + 1] = 7
            mx.eval(pool._keys, pool._values)

        row = {}
        scrub(); launch(mx.array(plan, dtype=mx.int32)); ref = snapshot()
        scrub(); launch_desc(verbose=(blocks == 1)); got = snapshot()
        scrub(); shipped_described(); got = snapshot()
        row["shipped_described_equal"] = bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]))
        row["desc_equal"] = bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]))
        for u in (2, 4, 8):
            scrub(); launch_desc(kernel=dku, extra=[("UNROLL", u)]); got = snapshot()
            row[f"unroll{u}_equal"] = bool(np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]))
        premade = mx.array(plan, dtype=mx.int32)
        mx.eval(premade)
        reused = mx.array(plan, dtype=mx.int32)
        mx.eval(reused)
        host = np.array(reused, copy=False)

        def rewrite():
            host[...] = plan
            launch(reused)
        for rnd in range(2):
            row.setdefault("fresh", []).append(timed(lambda: launch(mx.array(plan, dtype=mx.int32))))
            row.setdefault("premade", []).append(timed(lambda: launch(premade)))
            row.setdefault("desc", []).append(timed(launch_desc))
            row.setdefault("shipped_described", []).append(timed(shipped_described))
            for u in (2, 4, 8):
                row.setdefault(f"desc_unroll{u}", []).append(timed(lambda: launch_desc(kernel=dku, extra=[("UNROLL", u)])))
            try:
                row.setdefault("numpy_rewrite", []).append(timed(rewrite))
            except Exception as e:  # noqa
                row["numpy_rewrite"] = repr(e)
        src = cases.device_copy_source(ctx.nbytes)
        row["device_copy"] = timed(lambda: mx.eval(cases.device_copy(src)))
        row["sync"] = timed(lambda: None)
        pool.release_blocks(ids, "probe")
        results[f"{blocks}x{layers}"] = row
        print(f"{blocks}x{layers}", json.dumps(row), flush=True)
        cases.context.cache_clear()
    with open(f"{out_dir}/plan_probe.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
