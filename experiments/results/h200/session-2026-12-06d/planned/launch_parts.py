"""Where a store's kernel launch goes on CUDA, against the device copy of the same bytes: for each variant,
the Python call that builds the kernel's array (t1 - t0), ``mx.async_eval`` (t2 - t1), ``mx.eval`` until the
kernel is done (t3 - t2), the timer's ``mx.synchronize()`` (t4 - t3); median us over 2,000 calls after 200,
rounds alternated. Variants: the store's kernel as shipped (48 sources and their strides at 4x24); the same with short cases
(``compact``: a pointer to each source's strides); the launch's Python alone (``inputs``, no kernel); the same
kernel reading one pair of strides for all sources (``uniform``); an empty kernel with the same inputs but the description
(``empty_all``) and with 3 (``empty3``); the copy. Usage: launch_parts.py BLOCKS LAYERS OUT_JSON"""
import json
import sys
import time

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels as kernels
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.benchmarking import cases

blocks, layers = int(sys.argv[1]), int(sys.argv[2])
ctx = cases.context("smollm2-135m", blocks, layers, blocks)
pool = ctx.pool
reads = [adapter.read_layer_cache(c, whole_buffer=True) for c in ctx.caches]
sources = [(r[0], r[1]) for r in reads]
n_tokens = blocks * 256
ids = pool.allocate(blocks * layers, "probe")
assert ids == list(range(ids[0], ids[0] + len(ids))), "not one run"
described = ((0, 0, n_tokens, blocks),)
layouts = (0,) * layers
n = len(sources)


def uniform_source(n_sources):
    src = kernels._pack_source(n_sources, kernels._POOL_ROWS, kernels._DESCRIBED_ROW)
    for i in range(1, n_sources):
        for p in "kv":
            src = src.replace(f"{p}{i}_strides", f"{p}0_strides")
    return src


def compact_source(n_sources):
    """The shipped source with each case two short lines: the pointer, and a pointer to the strides."""
    cases_text = "\n".join(
        f"        case {i}: src = reinterpret_cast<const T*>(is_value ? (const void*)v{i} : (const void*)k{i}); "
        f"st = is_value ? &v{i}_strides[0] : &k{i}_strides[0]; break;" for i in range(n_sources))
    body = kernels._PACK_BLOCKS.replace("int64_t head_stride = 0, token_stride = 0, dim_stride = 0;",
                                        "const int64_t* st = nullptr;")
    body = body.replace("    }\n    src += head * head_stride;",
                        "    }\n    const int64_t head_stride = st[1], token_stride = st[2], dim_stride = st[3];\n"
                        "    src += head * head_stride;")
    assert "const int64_t* st" in body and "st[1]" in body
    return body.replace("ROW", kernels._DESCRIBED_ROW).replace("SOURCE_CASES", cases_text).replace(
        "DESTINATION", kernels._POOL_ROWS)


compact_kernel = mx.fast.cuda_kernel(
    name=f"probe_compact_{n}", input_names=[*kernels._source_names(n), "layouts", "desc", "k_pool", "v_pool"],
    output_names=["done"], source=compact_source(n), ensure_row_contiguous=False)
uniform_kernel = mx.fast.cuda_kernel(
    name=f"probe_uniform_{n}", input_names=[*kernels._source_names(n), "layouts", "desc", "k_pool", "v_pool"],
    output_names=["done"], source=uniform_source(n), ensure_row_contiguous=False)
empty_source = "if (threadIdx.x == 0 && blockIdx.x == 0) { done[0] = 1; }"
empty51 = mx.fast.cuda_kernel(name=f"probe_empty_{n}", input_names=[f"i{j}" for j in range(2 * n + 3)],
                              output_names=["done"], source=empty_source, ensure_row_contiguous=False)
empty3 = mx.fast.cuda_kernel(name="probe_empty_3", input_names=["a", "b", "c"], output_names=["done"],
                             source=empty_source, ensure_row_contiguous=False)
copy_src = cases.device_copy_source(ctx.nbytes)


def shipped():
    return kernels.write_described_blocks_in_place(pool._keys, pool._values, sources, ids[0], layouts, described,
                                                   256)


def launch_with(kernel):
    numbers = (ids[0], *described[0])
    desc = mx.as_strided(kernels._one_int(), (1,) * len(numbers), numbers)
    return kernels._pack_launch(kernel, sources, blocks * layers, 256,
                                [kernels._layout_array(layouts), desc, pool._keys, pool._values], [(1,)], [mx.uint8])[0]


def uniform():
    return launch_with(uniform_kernel)


def compact():
    return launch_with(compact_kernel)


def inputs_only():
    """The launch's Python without the kernel call: the inputs list, the template, the description."""
    numbers = (ids[0], *described[0])
    desc = mx.as_strided(kernels._one_int(), (1,) * len(numbers), numbers)
    inputs = [k for k, _ in sources] + [v for _, v in sources] + [kernels._layout_array(layouts), desc, pool._keys,
                                                                  pool._values]
    keys, values = sources[0]
    template = [("T", kernels._SAME_SIZE_UINT[keys.itemsize]), ("HEADS", keys.shape[1]), ("BLOCK_SIZE", 256),
                ("K_DIM", keys.shape[-1]), ("V_DIM", values.shape[-1])]
    return desc


all_inputs = [k for k, _ in sources] + [v for _, v in sources] + [kernels._layout_array(layouts), pool._keys,
                                                                  pool._values]


def empty_many():
    return empty51(inputs=all_inputs, grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                   output_dtypes=[mx.uint8])[0]


def empty_few():
    return empty3(inputs=all_inputs[:3], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                  output_dtypes=[mx.uint8])[0]


def copy():
    return cases.device_copy(copy_src)


VARIANTS = {"shipped": shipped, "compact": compact, "uniform": uniform, "inputs": inputs_only, "empty_all": empty_many,
            "empty3": empty_few, "copy": copy}
results = {name: {"build": [], "async_eval": [], "eval": [], "sync": [], "total": []} for name in VARIANTS}
for round_ in range(3):
    for name, fn in VARIANTS.items():
        parts = results[name]
        for i in range(200 + 700):
            mx.synchronize()
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            if name not in ("shipped", "inputs"):  # the shipped launch queues its own; "inputs" launches nothing
                mx.async_eval(out)
            t2 = time.perf_counter()
            mx.eval(out)
            t3 = time.perf_counter()
            mx.synchronize()
            t4 = time.perf_counter()
            if i >= 200:
                for key, value in zip(("build", "async_eval", "eval", "sync", "total"),
                                      (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    parts[key].append(value)
            del out
summary = {name: {k: round(float(np.median(v)) * 1e6, 1) for k, v in parts.items()} for name, parts in results.items()}
for name, parts in summary.items():
    print(f"{blocks}x{layers} {name:8s} " + "  ".join(f"{k} {v:6.1f}" for k, v in parts.items()), flush=True)
json.dump(summary, open(sys.argv[3], "w"), indent=1)

# The compact kernel writes what the shipped one does: launched with the layers' sources rotated by one (so
# its rows differ from what the timed launches left), then compared row by row with the sources.
rotated = sources[1:] + sources[:1]
numbers = (ids[0], *described[0])
desc = mx.as_strided(kernels._one_int(), (1,) * len(numbers), numbers)
mx.eval(kernels._pack_launch(compact_kernel, rotated, blocks * layers, 256,
                             [kernels._layout_array(layouts), desc, pool._keys, pool._values], [(1,)], [mx.uint8]))
same = all(mx.array_equal(table[ids[layer * blocks + b]], pair[part][0, :, b * 256:(b + 1) * 256]).item()
           for layer, pair in enumerate(rotated) for b in range(blocks)
           for part, table in enumerate((pool._keys, pool._values)))
print(f"{blocks}x{layers} compact kernel writes the sources' blocks: {same}", flush=True)
