"""The CUDA kernels' sources, compiled and run on the host where no CUDA device is.

``adapters/mlx_kernels.py`` builds its CUDA kernels from source strings that only a CUDA device compiles. Here
the host C++ compiler compiles each source as MLX would instantiate it (CUDA's built-in ``blockIdx``,
``threadIdx``, ``blockDim``, ``gridDim`` and ``uint4`` declared as plain C++, bfloat16 as a struct rounding each
operation to nearest even, as CUDA does), and the kernels run over their whole grid, one thread block and thread
at a time, against NumPy. Skipped without ``g++``; a CUDA device runs the kernels themselves
(``test_block_cache.py``, ``test_quantized_blocks.py``).
"""

import shutil
import subprocess
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest

from experiments import gpu_kernel_choices
from semantic.adapters import mlx_kernels, nvrtc

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="no host C++ compiler (g++)")

CUDA_BUILTINS = """
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#define __shared__ static
inline void __syncthreads() {}
struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x, y, z; };
dim3 blockIdx, threadIdx, blockDim, gridDim;
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        bits = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    __nv_bfloat16(int i) : __nv_bfloat16((float)i) {}
    operator float() const {
        const uint32_t u = (uint32_t)bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16((float)a * (float)b); }
inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16((float)a + (float)b); }
"""


def compile_and_run(source: str, tmp_path, stdin: str = "") -> str:
    path = tmp_path / "kernel.cpp"
    path.write_text(CUDA_BUILTINS + source)
    binary = tmp_path / "kernel"
    built = subprocess.run([GXX, "-std=c++17", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-o", str(binary),
                            str(path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, check=True).stdout


def precompiled(kernel, template, input_dtypes, output_dtypes) -> str:
    """``kernel``'s whole source as :mod:`semantic.adapters.nvrtc` has NVRTC compile it, for the host compiler:
    CUDA's headers left out (the builtins above stand in) and ``__global__`` empty."""
    source = nvrtc.kernel_source("gather", kernel._input_names, input_dtypes, kernel._output_names, output_dtypes,
                                 template, kernel._body)
    assert source.startswith(nvrtc.HEADERS)
    return "#define __global__\n" + source[len(nvrtc.HEADERS):]


@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("whole_source", [False, True], ids=["body", "precompiled"])
def test_the_row_gather_puts_each_row_in_its_output_pair(tmp_path, n_outputs, whole_source):
    """Every gathered row lands in its output pair, in order: rows split evenly between the pairs, whatever
    the grid's length (the kernel reads it from ``gridDim``, not from a template argument). Also the whole
    source compiled for CUDA (``whole_source``): MLX's signature (tables, rows, then outputs, typed by their
    dtypes), the template arguments as constants."""
    k_vecs, v_vecs, table_rows, threads = 4, 2, 7, 3
    rows = np.random.default_rng(n_outputs).integers(0, table_rows, size=2 * n_outputs, dtype=np.int32)
    names = mlx_kernels._output_names(n_outputs)
    outputs = [f"uint16_t* {name}" for name in names]
    kernel = mlx_kernels._row_pair_kernel(n_outputs)
    if whole_source:
        definition = precompiled(kernel, [("K_VECS", k_vecs), ("V_VECS", v_vecs)], [mx.bfloat16, mx.bfloat16, mx.int32],
                                 [mx.bfloat16] * len(names))
        definition += f"""
template <int K_VECS, int V_VECS>
void kernel(const uint16_t* k_table, const uint16_t* v_table, const int32_t* rows, {", ".join(outputs)}) {{
    semantic_kernels::gather((const __nv_bfloat16*)k_table, (const __nv_bfloat16*)v_table, rows,
                             {", ".join(f"(__nv_bfloat16*){name}" for name in names)});
}}
"""
    else:
        definition = f"""
template <int K_VECS, int V_VECS>
void kernel(const uint16_t* k_table, const uint16_t* v_table, const int32_t* rows, {", ".join(outputs)}) {{
{kernel._body}
}}
"""
    per_output = len(rows) // n_outputs
    main = definition + f"""

int main() {{
    const int K = {k_vecs} * 8, V = {v_vecs} * 8, n_rows = {len(rows)};
    uint16_t k_table[{table_rows} * K], v_table[{table_rows} * V];
    for (int i = 0; i < {table_rows} * K; i++) k_table[i] = (uint16_t)i;
    for (int i = 0; i < {table_rows} * V; i++) v_table[i] = (uint16_t)(30000 + i);
    const int32_t rows[] = {{{", ".join(map(str, rows))}}};
    static uint16_t k_out[{n_outputs}][{per_output} * K], v_out[{n_outputs}][{per_output} * V];
    gridDim = {{(unsigned)n_rows, 2, 1}};
    blockDim = {{{threads}, 1, 1}};
    for (unsigned y = 0; y < 2; y++)
        for (unsigned x = 0; x < (unsigned)n_rows; x++)
            for (unsigned t = 0; t < {threads}; t++) {{
                blockIdx = {{x, y, 0}};
                threadIdx = {{t, 0, 0}};
                kernel<{k_vecs}, {v_vecs}>(k_table, v_table, rows,
                    {", ".join([f"k_out[{i}]" for i in range(n_outputs)] + [f"v_out[{i}]" for i in range(n_outputs)])});
            }}
    for (int o = 0; o < {n_outputs}; o++) {{
        for (int i = 0; i < {per_output} * K; i++) printf("%d ", k_out[o][i]);
        for (int i = 0; i < {per_output} * V; i++) printf("%d ", v_out[o][i]);
    }}
}}
"""
    got = np.array(compile_and_run(main, tmp_path).split(), dtype=np.int64)
    k_table = np.arange(table_rows * k_vecs * 8).reshape(table_rows, -1)
    v_table = 30000 + np.arange(table_rows * v_vecs * 8).reshape(table_rows, -1)
    want = np.concatenate([np.concatenate([k_table[rows[o * per_output : (o + 1) * per_output]].ravel(),
                                           v_table[rows[o * per_output : (o + 1) * per_output]].ravel()])
                           for o in range(n_outputs)])
    np.testing.assert_array_equal(got, want)


def dequantizing_kernel(source: str, outputs) -> str:
    """A dequantizing row kernel's ``source`` as MLX instantiates it: a function template over its template
    arguments, taking the tables, the rows and the ``outputs`` (names) as pointers."""
    return f"""
template <typename T, int BITS, int GROUP_SIZE, int BLOCK_SIZE, int K_WORDS, int V_WORDS, int K_GROUPS, int V_GROUPS>
void kernel(const uint32_t* k_packed, const T* k_scales, const T* k_biases, const uint32_t* v_packed,
            const T* v_scales, const T* v_biases, const int32_t* rows, {", ".join(f"T* {name}" for name in outputs)}) {{
{source}
}}
"""


# bits -> (group size, key words, value words, key groups, value groups) per token slot: 4 bits, head dims 72
# and 32 in groups of 24 (the values' last group 8 values); 2 bits, head dims 96 and 48 in groups of 32.
DEQUANTIZE_GEOMETRY = {4: (24, 9, 4, 3, 2), 2: (32, 6, 3, 3, 2)}
DTYPES_AND_BITS = [("float", 4), ("__nv_bfloat16", 4), ("__nv_bfloat16", 2), ("float", 2)]


@pytest.mark.parametrize("n_outputs", [1, 2])
@pytest.mark.parametrize("dtype,bits", DTYPES_AND_BITS)
@pytest.mark.parametrize("whole_source", [False, True], ids=["body", "precompiled"])
def test_the_dequantizing_gather_writes_scale_times_q_plus_bias_for_every_word(tmp_path, n_outputs, dtype, bits,
                                                                             whole_source):
    """Every packed word of every gathered row is dequantized into its place in its output pair, whatever the
    grid's length, also in a row whose words do not fill the last round of a thread's four words (keys of 4 x 9
    words over 5 threads), with 4 and 2 bits, in float and in bfloat16. Scales are powers of two and biases
    integers, so the results are exact in either type on any host; a CUDA device checks the arithmetic against
    ``mx.dequantize``. Also the whole source compiled for CUDA (``whole_source``), as for the row gather."""
    outputs = mlx_kernels._output_names(n_outputs)
    definition = None
    if whole_source:
        group, k_words, v_words, k_groups, v_groups = DEQUANTIZE_GEOMETRY[bits]
        t = {"float": mx.float32, "__nv_bfloat16": mx.bfloat16}[dtype]
        template = [("T", t), ("BITS", bits), ("GROUP_SIZE", group), ("BLOCK_SIZE", 4), ("K_WORDS", k_words),
                    ("V_WORDS", v_words), ("K_GROUPS", k_groups), ("V_GROUPS", v_groups)]
        definition = precompiled(mlx_kernels._dequantize_rows_kernel(n_outputs), template,
                                 [mx.uint32, t, t, mx.uint32, t, t, mx.int32], [t] * len(outputs))
        definition += dequantizing_kernel("    semantic_kernels::gather(k_packed, k_scales, k_biases, v_packed, "
                                          f"v_scales, v_biases, rows, {', '.join(outputs)});", outputs)
    run_dequantizing_kernel(tmp_path, mlx_kernels.dequantize_rows_source(n_outputs), outputs, n_outputs, dtype, bits,
                            5, definition)


@pytest.mark.parametrize("variant", ["staged", "staged_scales"])
@pytest.mark.parametrize("dtype,bits", DTYPES_AND_BITS)
def test_the_staged_dequantize_variants_write_scale_times_q_plus_bias_for_every_word(tmp_path, variant, dtype, bits):
    """The experiment's ``staged`` variants (the row, or its scales and biases, in shared memory first)
    dequantize like the shipped kernel. One thread per block: run one thread at a time, a block of several would
    read shared memory before its other threads wrote it (the host has no barrier)."""
    source, outputs = gpu_kernel_choices.dequantize_sources()[variant]
    run_dequantizing_kernel(tmp_path, source, outputs, 1, dtype, bits, 1)


def run_dequantizing_kernel(tmp_path, source: str, outputs, n_outputs: int, dtype: str, bits: int,
                            threads: int, definition: Optional[str] = None) -> None:
    """Run a dequantizing row kernel over its whole grid, ``threads`` per block, on random tables of
    ``DEQUANTIZE_GEOMETRY[bits]`` (rows of whole 16-byte words), against NumPy's ``scale * q + bias``.
    ``definition``: the ``kernel`` template called, if not ``source`` made one (:func:`dequantizing_kernel`)."""
    tokens, table_rows = 4, 3
    group, k_words, v_words, k_groups, v_groups = DEQUANTIZE_GEOMETRY[bits]
    rng = np.random.default_rng(n_outputs)
    rows = rng.integers(0, table_rows, size=2 * n_outputs, dtype=np.int32)
    tables = {}
    for name, words, groups in (("k", k_words, k_groups), ("v", v_words, v_groups)):
        tables[name] = (rng.integers(0, 2**32, size=(table_rows, tokens, words), dtype=np.uint32),
                        np.exp2(rng.integers(-3, 4, size=(table_rows, tokens, groups))).astype(np.float32),
                        rng.integers(-8, 8, size=(table_rows, tokens, groups)).astype(np.float32))
    per_output = len(rows) // n_outputs

    def c_array(kind, name, values):
        literals = [f"{v!r}f" if isinstance(v, float) else repr(v) for v in values.ravel().tolist()]
        return f"const {kind} {name}[] = {{{', '.join(literals)}}};"

    main = f"""{definition or dequantizing_kernel(source, outputs)}
int main() {{
    {c_array("uint32_t", "k_packed", tables["k"][0])} {c_array(dtype, "k_scales", tables["k"][1])}
    {c_array(dtype, "k_biases", tables["k"][2])} {c_array("uint32_t", "v_packed", tables["v"][0])}
    {c_array(dtype, "v_scales", tables["v"][1])} {c_array(dtype, "v_biases", tables["v"][2])}
    {c_array("int32_t", "rows", rows)}
    const int K = {tokens * k_words * 32 // bits}, V = {tokens * v_words * 32 // bits};
    static {dtype} k_out[{n_outputs}][{per_output} * K], v_out[{n_outputs}][{per_output} * V];
    gridDim = {{{len(rows)}, 2, 1}};
    blockDim = {{{threads}, 1, 1}};
    for (unsigned y = 0; y < 2; y++)
        for (unsigned x = 0; x < {len(rows)}; x++)
            for (unsigned t = 0; t < {threads}; t++) {{
                blockIdx = {{x, y, 0}};
                threadIdx = {{t, 0, 0}};
                kernel<{dtype}, {bits}, {group}, {tokens}, {k_words}, {v_words}, {k_groups}, {v_groups}>(
                    k_packed, k_scales, k_biases, v_packed, v_scales, v_biases, rows,
                    {", ".join([f"k_out[{i}]" for i in range(n_outputs)] + [f"v_out[{i}]" for i in range(n_outputs)])});
            }}
    for (int o = 0; o < {n_outputs}; o++) {{
        for (int i = 0; i < {per_output} * K; i++) printf("%.9g ", (float)k_out[o][i]);
        for (int i = 0; i < {per_output} * V; i++) printf("%.9g ", (float)v_out[o][i]);
    }}
}}
"""
    got = np.array(compile_and_run(main, tmp_path).split(), dtype=np.float32)

    def dequantized(name, row):
        packed, scales, biases = (table[row] for table in tables[name])
        q = (packed[..., None] >> (bits * np.arange(32 // bits, dtype=np.uint32))) & (2**bits - 1)
        q = q.reshape(tokens, -1).astype(np.float32)
        group_of = np.arange(q.shape[1]) // group
        return (scales[:, group_of] * q + biases[:, group_of]).ravel()

    want = np.concatenate([np.concatenate([dequantized(name, row)
                                           for row in rows[o * per_output : (o + 1) * per_output]])
                           for o in range(n_outputs) for name in ("k", "v")])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", sorted(gpu_kernel_choices.dequantize_sources()))
def test_each_dequantize_variant_of_the_kernel_experiment_compiles(tmp_path, variant):
    """``experiments.gpu_kernel_choices`` keeps its own copies of the dequantizing kernel's variants, shipped
    one included: each is valid C++ as the experiment instantiates it (its copy of the shipped kernel once
    kept ``OUTPUT_SWITCH`` unreplaced and failed only on the GPU)."""
    source, outputs = gpu_kernel_choices.dequantize_sources()[variant]
    compile_and_run(f"""{dequantizing_kernel(source, outputs)}
template void kernel<float, 4, 64, 256, 32, 32, 4, 4>(const uint32_t*, const float*, const float*, const uint32_t*,
    const float*, const float*, const int32_t*, float*, float*);
int main() {{}}
""", tmp_path)


@pytest.mark.parametrize("unroll", [1, mlx_kernels.STORE_UNROLL])
@pytest.mark.parametrize("in_place,described", [(False, False), (True, False), (True, True)])
def test_the_block_writer_cuts_each_block_from_its_source_and_puts_it_in_its_place(tmp_path, in_place, described,
                                                                                   unroll):
    """The store's kernel, as MLX instantiates it, run over its whole grid: each new block gets its write's
    tokens (the source read through its strides: a contiguous source in 16-byte words, a transposed one
    element by element) and zeros in the slots outside them; into new arrays in the plan's order, or
    (``in_place``) into the pool's own arrays at each block's id, every other block of them untouched.
    ``described``: the rows come from a store's description (one run of ids), not from a plan array.
    ``unroll``: words a thread loads before storing them (three threads: a row's last round is partial)."""
    from semantic.domain import services

    heads, size, k_dim, v_dim, threads, n_pool = 2, 8, 8, 16, 3, 9
    lengths = (20, 21)  # source 0: tokens 0..19 in blocks 0..2; source 1: tokens 19..39 in blocks 2..5
    ids = ([2, 3, 4], [5, 6, 7, 8]) if described else ([5, 6, 7], [1, 8, 3, 0])
    writes = [(ids[0], 0, None, None, 0, 20), (ids[1], 2, None, None, 19, 21)]
    plan = services._pack_plan(writes, size)
    if described:
        layouts, layout_numbers = services._described_writes(writes, [*ids[0], *ids[1]], one_run=True)
        numbers = [ids[0][0], *(n for layout in layout_numbers for n in layout)]
        row_inputs = "const int32_t* layouts, const int64_t* desc_strides"
        row_arrays = (f"static const int32_t layouts[] = {{{', '.join(map(str, layouts))}}};\n"
                      f"    static const int64_t desc_strides[] = {{{', '.join(map(str, numbers))}}};")
        row_args, row = "layouts, desc_strides", mlx_kernels._DESCRIBED_ROW
    else:
        row_inputs, row_args, row = "const int32_t* plan", "plan", mlx_kernels._PLAN_ROW
        row_arrays = f"static const int32_t plan[] = {{{', '.join(map(str, plan.ravel()))}}};"
    rng = np.random.default_rng(0)
    data = [(rng.integers(1, 60000, (heads, n, k_dim)), rng.integers(1, 60000, (heads, n, v_dim))) for n in lengths]

    def source_arrays(i):  # source 0 row-contiguous [heads, tokens, dim]; source 1 stored as [dim, tokens, heads]
        out = []
        for name, values in zip(("k", "v"), data[i]):
            stored = values if i == 0 else values.transpose(2, 1, 0)
            strides = ([0, lengths[i] * values.shape[2], values.shape[2], 1] if i == 0
                       else [0, 1, heads, heads * lengths[i]])
            out.append(f"alignas(16) static const uint16_t {name}{i}[] = {{{', '.join(map(str, stored.ravel()))}}};\n"
                       f"static const int64_t {name}{i}_strides[] = {{{', '.join(map(str, strides))}}};")
        return "\n".join(out)

    rows = n_pool if in_place else len(plan)
    destination = mlx_kernels._POOL_ROWS if in_place else mlx_kernels._NEW_ROWS
    pointers = "const uint16_t* k_pool, const uint16_t* v_pool" if in_place else "uint16_t* k_out, uint16_t* v_out"
    main = f"""
{source_arrays(0)}
{source_arrays(1)}
template <typename T, int HEADS, int BLOCK_SIZE, int K_DIM, int V_DIM>
void kernel(const T* k0, const T* k1, const T* v0, const T* v1, {row_inputs}, {pointers}) {{
{mlx_kernels._pack_source(2, destination, row, unroll)}
}}

int main() {{
    {row_arrays}
    alignas(16) static uint16_t k[{rows * heads * size * k_dim}], v[{rows * heads * size * v_dim}];
    for (auto& x : k) x = 65535;
    for (auto& x : v) x = 65535;
    gridDim = {{{len(plan) * heads}, 2, 1}};
    blockDim = {{{threads}, 1, 1}};
    for (unsigned y = 0; y < 2; y++)
        for (unsigned x = gridDim.x; x-- > 0;)  // last row first: a write past a row's end is not overwritten
            for (unsigned t = 0; t < {threads}; t++) {{
                blockIdx = {{x, y, 0}};
                threadIdx = {{t, 0, 0}};
                kernel<uint16_t, {heads}, {size}, {k_dim}, {v_dim}>(k0, k1, v0, v1, {row_args}, k, v);
            }}
    for (auto x : k) printf("%d ", x);
    for (auto x : v) printf("%d ", x);
}}
"""
    got = np.array(compile_and_run(main, tmp_path).split(), dtype=np.int64)
    got_k = got[: rows * heads * size * k_dim].reshape(rows, heads, size, k_dim)
    got_v = got[rows * heads * size * k_dim :].reshape(rows, heads, size, v_dim)
    want_k, want_v = np.full_like(got_k, 65535), np.full_like(got_v, 65535)
    for k, (block_ids, first_index, _, _, first_token, n_tokens) in enumerate(
            [writes[0]] * 3 + [writes[1]] * 4):
        source = 0 if k < 3 else 1
        index = k if k < 3 else k - 3
        row = block_ids[index] if in_place else k
        for want, values in ((want_k, data[source][0]), (want_v, data[source][1])):
            want[row] = 0
            for slot in range(size):
                token = (first_index + index) * size + slot
                if first_token <= token < first_token + n_tokens:
                    want[row, :, slot] = values[:, token - first_token]
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
