"""Row gathers and block writes for the block pool, per MLX backend.

On CPU, ``mx.take`` of whole rows already runs at memcpy speed. On CUDA, MLX's
generic gather indexes every element and was measured at 7x a plain copy of the
same bytes (H100, 3 GiB: 17 ms vs 2.4 ms), so there a small kernel copies each
row with 16-byte loads and stores, one thread block per row.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import mlx.core as mx
import numpy as np

_ROW_COPY = """
    const uint4* src = reinterpret_cast<const uint4*>(table) + (size_t)rows[blockIdx.x] * VECS;
    uint4* dst = reinterpret_cast<uint4*>(out) + (size_t)blockIdx.x * VECS;
    for (int i = threadIdx.x; i < VECS; i += blockDim.x) {
        dst[i] = src[i];
    }
"""
_THREADS = 256


@functools.lru_cache(maxsize=None)
def _row_copy_kernel():
    return mx.fast.cuda_kernel(name="semantic_row_gather", input_names=["table", "rows"], output_names=["out"],
                               source=_ROW_COPY)


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def gather_rows(table: mx.array, rows: mx.array) -> mx.array:
    """``table[rows]`` for a contiguous ``table`` ``[n_rows, *row_shape]`` and integer ``rows`` of any shape;
    the result is ``rows.shape + row_shape``."""
    row_shape = table.shape[1:]
    row_bytes = table.itemsize * table[0].size
    if not _on_cuda() or row_bytes % 16:
        return mx.take(table, rows, axis=0)
    flat = rows.reshape(-1).astype(mx.int32)
    (out,) = _row_copy_kernel()(
        inputs=[table, flat],
        template=[("VECS", row_bytes // 16)],
        grid=(flat.size * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(flat.size,) + row_shape],
        output_dtypes=[table.dtype],
    )
    return out.reshape(rows.shape + row_shape)


_SAME_SIZE_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def writes_through_host() -> bool:
    """On the CPU device, blocks are written through a NumPy view of the pool's arrays: MLX's CPU
    scatter moved ~0.2 GB/s where a NumPy row copy runs at memory speed."""
    return mx.default_device() == mx.cpu


def host_view(array: mx.array) -> np.ndarray:
    """A NumPy view sharing ``array``'s memory (evaluated first), its elements as same-size unsigned
    ints so bfloat16 needs no NumPy support. Writes through it change ``array`` in place: only for
    arrays no computation still reads (the pool writes only blocks nothing refers to)."""
    return np.array(array.view(_SAME_SIZE_UINT[array.itemsize]), copy=False)


# One thread per packed uint32 word of the output: it reads the word, its group's scale and bias, and
# writes 32 / BITS values. Same arithmetic, in T, as MLX's own affine_dequantize (scale * q + bias), so
# the result is bit-identical to mx.dequantize; a word never spans two groups (GROUP >= 32). The grid
# is exactly one thread per word (the thread-block size divides a row's words), so no bound check.
_GATHER_DEQUANTIZE = """
    const size_t word = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t words_per_row = (size_t)TOKENS * WORDS;
    const size_t out_row = word / words_per_row;
    const size_t in_row_word = word % words_per_row;
    const size_t token = in_row_word / WORDS;
    const size_t first = (in_row_word % WORDS) * (32 / BITS);
    const size_t src = (size_t)rows[out_row];
    const uint32_t bits_word = packed[src * words_per_row + in_row_word];
    const size_t group = src * TOKENS * (DIM / GROUP) + token * (DIM / GROUP) + first / GROUP;
    const T scale = scales[group];
    const T bias = biases[group];
    T* dst = out + out_row * TOKENS * DIM + token * DIM + first;
    #pragma unroll
    for (int i = 0; i < 32 / BITS; i++) {
        const uint8_t q = (bits_word >> (BITS * i)) & ((1u << BITS) - 1u);
        dst[i] = scale * static_cast<T>(q) + bias;
    }
"""
DEQUANTIZING_GATHER_FLAG = "SEMANTIC_DEQUANTIZING_GATHER"
"""Set to 1 to rebuild quantized blocks on CUDA with the one-kernel dequantizing gather. Off by default
until it is verified on a GPU: ``tests/test_quantized_blocks.py::test_the_cuda_dequantizing_gather_
equals_the_portable_path`` compares the two bit for bit."""


@functools.lru_cache(maxsize=None)
def _gather_dequantize_kernel():
    return mx.fast.cuda_kernel(name="semantic_gather_dequantize", input_names=["packed", "scales", "biases", "rows"],
                               output_names=["out"], source=_GATHER_DEQUANTIZE)


def dequantizing_gather_kernel_enabled() -> bool:
    return _on_cuda() and os.environ.get(DEQUANTIZING_GATHER_FLAG) == "1"


def gather_dequantized(packed: mx.array, scales: mx.array, biases: mx.array, rows: mx.array, *, group_size: int,
                       bits: int, kernel: Optional[bool] = None) -> mx.array:
    """``mx.dequantize`` of rows ``rows`` of three tables of one quantized array (``[n_rows, tokens, width]``
    each, as ``gather_rows`` takes them); the result is ``rows.shape + (tokens, head_dim)`` in the scales' dtype.

    Portable path (the default everywhere): three row gathers, then one dequantize. On CUDA with
    ``SEMANTIC_DEQUANTIZING_GATHER=1`` (or ``kernel=True``), one kernel reads each packed row once and writes
    the dequantized values straight into the cache layout.
    """
    if kernel is None:
        kernel = dequantizing_gather_kernel_enabled()
    if not kernel:
        return mx.dequantize(gather_rows(packed, rows), gather_rows(scales, rows), gather_rows(biases, rows),
                             group_size=group_size, bits=bits)
    _, tokens, words = packed.shape
    dim = words * 32 // bits
    flat = rows.reshape(-1).astype(mx.int32)
    (out,) = _gather_dequantize_kernel()(
        inputs=[packed, scales, biases, flat],
        template=[("T", scales.dtype), ("BITS", bits), ("GROUP", group_size), ("TOKENS", tokens), ("WORDS", words),
                  ("DIM", dim)],
        grid=(flat.size * tokens * words, 1, 1),
        threadgroup=(math.gcd(tokens * words, _THREADS), 1, 1),
        output_shapes=[(flat.size, tokens, dim)],
        output_dtypes=[scales.dtype],
    )
    return out.reshape(rows.shape + (tokens, dim))
