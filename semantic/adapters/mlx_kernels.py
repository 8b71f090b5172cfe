"""Row gathers and block writes for the block pool, per MLX backend.

On CPU, ``mx.take`` of whole rows already runs at memcpy speed. On CUDA, MLX's
generic gather indexes every element and was measured at 7x a plain copy of the
same bytes (H100, 3 GiB: 17 ms vs 2.4 ms), so there a small kernel copies each
row with 16-byte loads and stores, one thread block per row.
"""

from __future__ import annotations

import functools

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


def gather_dequantized(packed: mx.array, scales: mx.array, biases: mx.array, rows: mx.array, *, group_size: int,
                       bits: int) -> mx.array:
    """``mx.dequantize`` of rows ``rows`` of three tables of one quantized array (``[n_rows, *row_shape]``
    each, as ``gather_rows`` takes them); the result is ``rows.shape + (tokens, head_dim)`` in the scales' dtype.

    Portable path: three row gathers, then one dequantize (every backend). The GPU
    form reads each packed row once and writes the dequantized row straight into
    the cache layout: one kernel launched with the same ``rows`` index, the
    ``VECS``-style template of ``_ROW_COPY`` extended by ``bits`` and ``group_size``.
    """
    return mx.dequantize(gather_rows(packed, rows), gather_rows(scales, rows), gather_rows(biases, rows),
                         group_size=group_size, bits=bits)
