"""The CUDA kernels' sources, compiled and run on the host where no CUDA device is.

``adapters/mlx_kernels.py`` builds its CUDA kernels from source strings that only a CUDA device compiles. Here
the host C++ compiler compiles each source as MLX would instantiate it (CUDA's built-in ``blockIdx``,
``threadIdx``, ``blockDim``, ``gridDim`` and ``uint4`` declared as plain C++), and the row gather runs over its
whole grid, one thread block and thread at a time, against NumPy's gather of the same rows. Skipped without
``g++``; a CUDA device runs the kernels themselves (``test_block_cache.py``, ``test_quantized_blocks.py``).
"""

import shutil
import subprocess

import numpy as np
import pytest

from semantic.adapters import mlx_kernels

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="no host C++ compiler (g++)")

CUDA_BUILTINS = """
#include <cstddef>
#include <cstdint>
#include <cstdio>
struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x, y, z; };
dim3 blockIdx, threadIdx, blockDim, gridDim;
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
"""


def compile_and_run(source: str, tmp_path, stdin: str = "") -> str:
    path = tmp_path / "kernel.cpp"
    path.write_text(CUDA_BUILTINS + source)
    binary = tmp_path / "kernel"
    built = subprocess.run([GXX, "-std=c++17", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-o", str(binary),
                            str(path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_the_row_gather_puts_each_row_in_its_output_pair(tmp_path, n_outputs):
    """Every gathered row lands in its output pair, in order: rows split evenly between the pairs, whatever
    the grid's length (the kernel reads it from ``gridDim``, not from a template argument)."""
    k_vecs, v_vecs, table_rows, threads = 4, 2, 7, 3
    rows = np.random.default_rng(n_outputs).integers(0, table_rows, size=2 * n_outputs, dtype=np.int32)
    outputs = [f"uint16_t* k_out{i}" for i in range(n_outputs)] + [f"uint16_t* v_out{i}" for i in range(n_outputs)]
    source = mlx_kernels._ROW_PAIR_COPY.replace("OUTPUT_SWITCH", mlx_kernels._output_switch(n_outputs, "void*"))
    per_output = len(rows) // n_outputs
    main = f"""
template <int K_VECS, int V_VECS>
void kernel(const uint16_t* k_table, const uint16_t* v_table, const int32_t* rows, {", ".join(outputs)}) {{
{source}
}}

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


@pytest.mark.parametrize("n_outputs", [1, 2])
def test_the_dequantizing_gather_compiles_as_mlx_instantiates_it(tmp_path, n_outputs):
    """The dequantizing row kernel's source, with ``n_outputs`` output pairs, is valid C++ for a float ``T``
    (its arithmetic is checked against ``mx.dequantize`` on a CUDA device)."""
    outputs = [f"float* k_out{i}" for i in range(n_outputs)] + [f"float* v_out{i}" for i in range(n_outputs)]
    source = mlx_kernels._DEQUANTIZE_ROWS.replace("OUTPUT_SWITCH", mlx_kernels._output_switch(n_outputs, "T*"))
    compile_and_run(f"""
template <typename T, int BITS, int GROUP_SIZE, int BLOCK_SIZE, int K_WORDS, int V_WORDS, int K_GROUPS, int V_GROUPS>
void kernel(const uint32_t* k_packed, const T* k_scales, const T* k_biases, const uint32_t* v_packed,
            const T* v_scales, const T* v_biases, const int32_t* rows, {", ".join(outputs)}) {{
{source}
}}
template void kernel<float, 4, 32, 16, 8, 8, 2, 2>(const uint32_t*, const float*, const float*, const uint32_t*,
    const float*, const float*, const int32_t*, {", ".join(["float*"] * 2 * n_outputs)});
int main() {{}}
""", tmp_path)
