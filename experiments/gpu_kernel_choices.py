"""The CUDA write and dequantize paths against the alternatives they were chosen over, in one process:

    python -m experiments.gpu_kernel_choices --output DIR/choices.json [--parts store,dequantize,floor]

- ``store``, per EXP-006 case: what the pool does on CUDA (``pool_write``: ``BlockPool.write_many``, one
  kernel writing every layer's new blocks into the pool's arrays) against the paths it replaced: the same
  kernel cutting the blocks into new arrays, then one slice write per run of ids as 8-byte words
  (``pack_then_slice``), and one slice write per layer straight from its source (``per_layer_writes``, as
  words: one pass over the bytes, but two launches per layer); all leave the cache's bytes (checked). And the
  pool's kernel alone, its threads loading 1, 2, 4 or 8 words before storing them (``kernel_unroll<n>``;
  ``mlx_kernels.STORE_UNROLL`` ships).
- ``dequantize``, 32 blocks x 48 layers of gemma3-12b-full in q4: the shipped kernel
  (``mlx_kernels._DEQUANTIZE_ROWS``, four packed words loaded per thread before their stores) at 128/256/512
  threads against the same loop with other numbers of words in flight (``unrolled1``: one word, the kernel
  shipped before), 16-byte packed loads (four words per thread), a row staged in shared memory first
  (``staged``) and only its scales and biases staged (``staged_scales``); each checked bit for bit against ``mx.dequantize``, then timed in three rounds that alternate
  every variant with the baselines. Tried and not kept (no gain on an H100 or an
  H200; docs/results/exp-014.md): bfloat16 values two per instruction with no integer conversion, streaming
  stores. The dense row gather and rebuild of the same context are the baseline.
- ``floor``: what a timed call costs when it does nothing but synchronize, and when it evaluates one
  slice of an evaluated array (no kernel): the floor under the 1 x 12 rebuild.

Timings: p50 / p95 in ms (``cases.time_samples``, synchronized); CUDA only.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from experiments.records import provenance, write_record
from semantic.adapters import mlx_kernels
from semantic.benchmarking import cases
from semantic.domain import services


def percentiles(fn: Callable[[], object], repeat: int, warmup: int = 5) -> List[float]:
    samples = cases.time_samples(fn, repeat, warmup=warmup, sync=True)
    return [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]


# ---- store: one kernel into the pool, pack kernel + slice write, or one slice write per layer -------
UNROLLS = sorted({1, 2, mlx_kernels.STORE_UNROLL, 8})


def store_paths(repeat: int, rounds: int = 2) -> Dict[str, dict]:
    out = {}
    for case in cases.TARGET_CASES:
        ctx = cases.context(case.geometry, case.blocks, case.layers, case.blocks)
        pool, heads, n = ctx.pool, ctx.spec.n_kv_heads, case.blocks
        sources = [(c.keys, c.values) for c in ctx.caches]
        ids = pool.allocate(n * case.layers, "choices")
        writes = [(ids[layer * n:(layer + 1) * n], 0, keys, values, 0, n * ctx.spec.block_size)
                  for layer, (keys, values) in enumerate(sources)]
        plan = services._pack_plan(writes, ctx.spec.block_size)

        def replace_arrays(write) -> None:  # MLX slice updates: a reference to an old array left would copy it
            dtype = pool._keys.dtype
            arenas = [mlx_kernels.word_view(pool._keys), mlx_kernels.word_view(pool._values)]
            pool._keys = pool._values = None
            write(arenas)
            pool._keys, pool._values = (arena.view(dtype) for arena in arenas)
            mx.eval(pool._keys, pool._values)

        def pack_then_slice(arenas) -> None:
            parts = mlx_kernels.pack_blocks(sources, plan, ctx.spec.block_size)
            for k in range(2):
                arenas[k][ids[0]:ids[0] + len(ids)] = mlx_kernels.word_view(parts[k])

        def per_layer(arenas) -> None:
            for layer, (keys, values) in enumerate(sources):
                first = ids[0] + layer * n
                for arena, data in zip(arenas, (keys, values)):
                    data = mlx_kernels.word_view(data)  # the sources hold whole blocks: contiguous, the view is free
                    arena[first:first + n] = data.reshape(heads, n, -1, data.shape[-1]).transpose(1, 0, 2, 3)

        described = services._described_writes(writes, ids, one_run=True)

        def kernel_alone(unroll: int) -> Callable[[], None]:  # the pool's kernel, no pool checks around it
            return lambda: mx.eval(mlx_kernels.write_described_blocks_in_place(
                pool._keys, pool._values, sources, ids[0], *described, ctx.spec.block_size, unroll=unroll))

        sides = {"pool_write": lambda: pool.write_many(writes),
                 "pack_then_slice": lambda: replace_arrays(pack_then_slice),
                 "per_layer_writes": lambda: replace_arrays(per_layer),
                 **{f"kernel_unroll{u}": kernel_alone(u) for u in UNROLLS}}
        row = {"MiB": ctx.nbytes / 2**20, "device_copy": percentiles(cases.plain_copy(ctx.nbytes), repeat),
               "pack_kernel_alone": percentiles(lambda: mx.eval(mlx_kernels.pack_blocks(sources, plan, ctx.spec.block_size)), repeat)}
        for _ in range(rounds):  # alternated
            for name, side in sides.items():
                row.setdefault(name, []).append(percentiles(side, repeat))
        index = mx.array(ids)
        row["same_bytes"] = []
        for side in sides.values():
            pool._keys = mx.zeros_like(pool._keys)
            side()
            written = mx.take(pool._keys, index, axis=0)
            row["same_bytes"].append(bool(mx.array_equal(written, mx.concatenate([k for k, _ in sources], axis=0).reshape(
                case.layers, heads, n, -1, written.shape[-1]).transpose(0, 2, 1, 3, 4).reshape(written.shape)).item()))
        out[case.name] = row
        print(case.name, row, file=sys.stderr, flush=True)
        del written, sources, writes
        pool.release_blocks(ids, "choices")
        cases.context.cache_clear()
        del ctx, pool
        mx.clear_cache()
    return out


# ---- dequantize: the shipped kernel against unrolled and wide-load variants -------------------------
_POINTERS = """
    constexpr int PACK = 32 / BITS;
    const bool is_value = blockIdx.y == 1;
    const int words = is_value ? V_WORDS : K_WORDS;
    const int groups = is_value ? V_GROUPS : K_GROUPS;
    const size_t row = rows[blockIdx.x];
    const uint32_t* __restrict__ packed = (is_value ? v_packed : k_packed) + row * BLOCK_SIZE * words;
    const T* __restrict__ scales = (is_value ? v_scales : k_scales) + row * BLOCK_SIZE * groups;
    const T* __restrict__ biases = (is_value ? v_biases : k_biases) + row * BLOCK_SIZE * groups;
    T* __restrict__ out = (is_value ? v_out : k_out) + (size_t)blockIdx.x * BLOCK_SIZE * words * PACK;
    struct alignas(sizeof(T) * PACK >= 16 ? 16 : sizeof(T) * PACK) Values { T v[PACK]; };
    const int total = BLOCK_SIZE * words;
"""
# UNROLL words per thread, all loaded before any is stored (coalesced: word i by thread i % blockDim).
_UNROLLED = _POINTERS + """
    for (int base = threadIdx.x; base < total; base += UNROLL * blockDim.x) {
        uint32_t bits[UNROLL]; T scale[UNROLL], bias[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = base + u * blockDim.x;
            if (i < total) {
                const int group = (i / words) * groups + (i % words) * PACK / GROUP_SIZE;
                bits[u] = packed[i]; scale[u] = scales[group]; bias[u] = biases[group];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = base + u * blockDim.x;
            if (i < total) {
                Values values;
#pragma unroll
                for (int j = 0; j < PACK; j++) {
                    values.v[j] = scale[u] * static_cast<T>((bits[u] >> (BITS * j)) & ((1u << BITS) - 1)) + bias[u];
                }
                *reinterpret_cast<Values*>(out + (size_t)i * PACK) = values;
            }
        }
    }
"""
# Four words per thread through one 16-byte load (needs words % 4 == 0 and 4 * PACK values in one group).
_WIDE_LOADS = _POINTERS + """
    const uint4* __restrict__ wide = reinterpret_cast<const uint4*>(packed);
    for (int i = threadIdx.x; i < total / 4; i += blockDim.x) {
        const int group = ((4 * i) / words) * groups + ((4 * i) % words) * PACK / GROUP_SIZE;
        const T scale = scales[group], bias = biases[group];
        const uint4 w = wide[i];
        const uint32_t bits[4] = {w.x, w.y, w.z, w.w};
        Values* dst = reinterpret_cast<Values*>(out + (size_t)i * 4 * PACK);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            Values values;
#pragma unroll
            for (int j = 0; j < PACK; j++) {
                values.v[j] = scale * static_cast<T>((bits[k] >> (BITS * j)) & ((1u << BITS) - 1)) + bias;
            }
            dst[k] = values;
        }
    }
"""


# The row's packed words (16-byte loads; needs a row of whole 16-byte words), scales and biases staged in shared
# memory first, then dequantized from there, one word per thread as in the shipped loop. On an H200 (2026-12-03,
# a probe not kept) this ran 1.29-1.36 ms against the shipped kernel's 1.35-1.39; not yet run on an H100. Static
# shared memory: a row of up to 48 KiB (gemma3-12b-full's is 36).
_STAGED = _POINTERS + """
    constexpr int MAX_WORDS = BLOCK_SIZE * (K_WORDS > V_WORDS ? K_WORDS : V_WORDS);
    constexpr int MAX_GROUPS = BLOCK_SIZE * (K_GROUPS > V_GROUPS ? K_GROUPS : V_GROUPS);
    __shared__ uint4 staged_words[MAX_WORDS / 4];
    __shared__ T staged_scales[MAX_GROUPS], staged_biases[MAX_GROUPS];
    const uint4* __restrict__ wide = reinterpret_cast<const uint4*>(packed);
    for (int i = threadIdx.x; i < total / 4; i += blockDim.x) {
        staged_words[i] = wide[i];
    }
    for (int i = threadIdx.x; i < BLOCK_SIZE * groups; i += blockDim.x) {
        staged_scales[i] = scales[i];
        staged_biases[i] = biases[i];
    }
    __syncthreads();
    const uint32_t* words_of_row = reinterpret_cast<const uint32_t*>(staged_words);
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int group = (i / words) * groups + (i % words) * PACK / GROUP_SIZE;
        const uint32_t bits = words_of_row[i];
        Values values;
#pragma unroll
        for (int j = 0; j < PACK; j++) {
            const uint8_t q = (bits >> (BITS * j)) & ((1u << BITS) - 1);
            values.v[j] = staged_scales[group] * static_cast<T>(q) + staged_biases[group];
        }
        *reinterpret_cast<Values*>(out + (size_t)i * PACK) = values;
    }
"""


# Only the row's scales and biases staged in shared memory (4 KiB for gemma3-12b-full, not 36: more blocks per
# SM), the packed words read as in the shipped loop, four per thread before their stores.
_STAGED_SCALES = _POINTERS + """
    constexpr int UNROLL = 4;
    constexpr int MAX_GROUPS = BLOCK_SIZE * (K_GROUPS > V_GROUPS ? K_GROUPS : V_GROUPS);
    __shared__ T staged_scales[MAX_GROUPS], staged_biases[MAX_GROUPS];
    for (int i = threadIdx.x; i < BLOCK_SIZE * groups; i += blockDim.x) {
        staged_scales[i] = scales[i];
        staged_biases[i] = biases[i];
    }
    __syncthreads();
    for (int base = threadIdx.x; base < total; base += UNROLL * blockDim.x) {
        uint32_t bits[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = base + u * blockDim.x;
            if (i < total) bits[u] = packed[i];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = base + u * blockDim.x;
            if (i < total) {
                const int group = (i / words) * groups + (i % words) * PACK / GROUP_SIZE;
                const T scale = staged_scales[group], bias = staged_biases[group];
                Values values;
#pragma unroll
                for (int j = 0; j < PACK; j++) {
                    const uint8_t q = (bits[u] >> (BITS * j)) & ((1u << BITS) - 1);
                    values.v[j] = scale * static_cast<T>(q) + bias;
                }
                *reinterpret_cast<Values*>(out + (size_t)i * PACK) = values;
            }
        }
    }
"""


@functools.lru_cache(maxsize=None)
def _kernel(name: str, source: str, output_names: Tuple[str, ...]):
    return mx.fast.cuda_kernel(name=name, output_names=list(output_names), source=source,
                               input_names=["k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases",
                                            "rows"])


def dequantize_sources() -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """Each dequantize variant's kernel source and output names, by variant (its thread counts aside). The
    shipped kernel writes one of several output pairs per thread block (``OUTPUT_SWITCH``); here its one-pair form."""
    pair = ("k_out", "v_out")
    shipped = mlx_kernels.dequantize_rows_source(1)
    return {"shipped": (shipped, tuple(mlx_kernels._output_names(1))),
            **{f"unrolled{u}": (f"constexpr int UNROLL = {u};" + _UNROLLED, pair) for u in (1, 2, 4, 8)},
            "wide_loads": (_WIDE_LOADS, pair), "staged": (_STAGED, pair), "staged_scales": (_STAGED_SCALES, pair)}


_THREADS = {"shipped": (128, 256, 512), "unrolled1": (256,), "unrolled2": (256, 512), "unrolled4": (256, 128, 512),
            "unrolled8": (128,), "wide_loads": (128, 256, 512), "staged": (256, 512, 1024),
            "staged_scales": (256, 512)}


def _variant(name: str, source: str, outputs: Tuple[str, ...], threads: int):
    def run(keys, values, rows, group_size: int, bits: int):
        flat, tokens, dtype = rows.reshape(-1), keys[0].shape[1], keys[1].dtype
        dims = [t[0].shape[-1] * 32 // bits for t in (keys, values)]
        return _kernel(name, source, outputs)(
            inputs=[*keys, *values, flat],
            template=[("T", dtype), ("BITS", bits), ("GROUP_SIZE", group_size), ("BLOCK_SIZE", tokens),
                      ("K_WORDS", keys[0].shape[-1]), ("V_WORDS", values[0].shape[-1]),
                      ("K_GROUPS", keys[1].shape[-1]), ("V_GROUPS", values[1].shape[-1])],
            grid=(flat.size * threads, 2, 1), threadgroup=(threads, 1, 1),
            output_shapes=[(flat.size, tokens, d) for d in dims], output_dtypes=[dtype, dtype])
    return run


def _variants() -> Dict[str, Callable]:
    sources = dequantize_sources()
    return {f"{name}_{t}": _variant(f"choices_{name}_{t}", *sources[name], t)
            for name, threads in _THREADS.items() for t in threads}


def dequantize_variants(repeat: int, geometry: str = "gemma3-12b-full", blocks: int = 32, layers: int = 48,
                        rounds: int = 3) -> dict:
    """Each variant checked once, then timed in ``rounds`` rounds, each round going through the dense rebuild,
    its gather kernel, the copy, the q4 rebuild and every variant in turn (a lent GPU drifts within minutes:
    comparisons hold within a round)."""
    dense = cases.context(geometry, blocks, layers, 0, "dense")
    dense_rows = dense.pool.gather_rows(dense.handle.all_block_ids)
    ctx = cases.context(geometry, blocks, layers, 0, "q4")
    arenas = ctx.pool._quantized
    tables, fmt = arenas._row_tables(), arenas.format
    rows = ctx.pool.gather_rows(ctx.handle.all_block_ids).index
    keys, values = tuple(tables[:3]), tuple(tables[3:])
    reference = [mx.dequantize(*(mx.take(t, rows.reshape(-1), axis=0) for t in part), group_size=fmt.group_size,
                               bits=fmt.bits) for part in (keys, values)]
    mx.eval(reference)
    variants = _variants()
    timed = {"dense_rebuild": lambda: cases.reconstruct(dense),
             "dense_gather_kernel": lambda: mx.eval(dense.pool.gather(rows=dense_rows)),
             "device_copy": cases.plain_copy(dense.nbytes), "q4_rebuild": lambda: cases.reconstruct(ctx),
             **{name: functools.partial(lambda fn: mx.eval(fn(keys, values, rows, fmt.group_size, fmt.bits)), fn)
                for name, fn in variants.items()}}
    out = {"case": f"{geometry} {blocks}x{layers}", "rounds": rounds,
           "bit_exact": {name: all(bool(mx.array_equal(a.view(mx.uint16), b.view(mx.uint16)).item())
                                   for a, b in zip(fn(keys, values, rows, fmt.group_size, fmt.bits), reference))
                         for name, fn in variants.items()},
           "p50_p95_by_round": {name: [] for name in timed}}
    del reference
    for _ in range(rounds):
        for name, fn in timed.items():
            out["p50_p95_by_round"][name].append(percentiles(fn, repeat))
        by_round = out["p50_p95_by_round"]
        print("q4/dense rebuild", round(by_round["q4_rebuild"][-1][0] / by_round["dense_rebuild"][-1][0], 3),
              {name: by_round[name][-1] for name in timed}, file=sys.stderr, flush=True)
    cases.context.cache_clear()
    return out


def floor(repeat: int) -> dict:
    ctx = cases.context("smollm2-135m", 1, 12, 0)
    keys = ctx.pool._keys
    return {"synchronize_only": percentiles(lambda: None, repeat, 20),
            "eval_one_slice": percentiles(lambda: mx.eval(keys[0:1]), repeat, 20),
            "rebuild_1x12": percentiles(lambda: cases.reconstruct(ctx), repeat, 20)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path)
    parser.add_argument("--parts", default="store,dequantize,floor")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    if not mlx_kernels._on_cuda():
        parser.error("these are the CUDA paths: run it on an NVIDIA GPU")
    parts = {"store": store_paths, "dequantize": dequantize_variants, "floor": floor}
    record = {**provenance("experiments.gpu_kernel_choices", argv)}
    for part in args.parts.split(","):
        record[part] = parts[part](args.repeat)
        write_record(args.output, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
