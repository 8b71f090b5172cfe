"""Row gathers and block writes for the block pool, per MLX backend.

On CPU, ``mx.take`` of whole rows runs at ~0.6x memcpy speed on one thread, so a
gather's values are taken on a second CPU stream (another thread) beside its keys; a quantized
pool's values are dequantized and quantized there too (MLX's CPU kernels for both use one thread).
On CUDA, MLX's generic gather indexes every element and was measured at 7x a plain copy of the
same bytes (H100, 3 GiB: 17 ms vs 2.4 ms), so there a small kernel copies each
row with 16-byte loads and stores, one thread block per row, keys and values in
the same launch (a launch costs about as much as copying a 2 MiB context). A store
on CUDA is one kernel too, cutting each new block from its layer's cache and
writing it into the pool's arrays themselves (:func:`write_blocks_in_place`).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import mlx.core as mx
import numpy as np

from semantic.adapters.nvrtc import PrecompiledKernel

T = TypeVar("T")

# One thread block per gathered row, keys and values in the same launch; the rows split evenly between the
# output pairs, in order (several pairs: layers in buffers of their own).
_ROW_PAIR_COPY = """
    const bool is_value = blockIdx.y == 1;
    const int vecs = is_value ? V_VECS : K_VECS;
    const uint4* src = reinterpret_cast<const uint4*>(is_value ? v_table : k_table)
        + (size_t)rows[blockIdx.x] * vecs;
    void* out = nullptr;
OUTPUT_SWITCH
    uint4* dst = reinterpret_cast<uint4*>(out) + (size_t)row_in_output * vecs;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        dst[i] = src[i];
    }
"""
_THREADS = 256


def _output_switch(n_outputs: int, pointer: str) -> str:
    """Kernel source setting ``out`` to this thread block's pair's key or value array and ``row_in_output`` to
    its row's place there (one thread block per row, the rows split evenly between the output pairs). From
    the grid, not a template argument: MLX compiles a kernel per set of template arguments, and the row count
    changes with every context length."""
    cases = "\n".join(f"        case {i}: out = is_value ? ({pointer})v_out{i} : ({pointer})k_out{i}; break;"
                      for i in range(n_outputs))
    return (f"    const unsigned int rows_per_output = gridDim.x / {n_outputs};\n"
            "    const unsigned int row_in_output = blockIdx.x % rows_per_output;\n"
            f"    switch (blockIdx.x / rows_per_output) {{\n{cases}\n    }}")


def _one_output(pointer: str) -> str:
    """:func:`_output_switch` of one output pair, without the switch and its divisions: so the dequantizing
    kernel ran 3-4 % faster on an H100 (2026-12-06, ``experiments/results/h200/session-2026-12-06g``), the row
    copy 0.2-0.9 % slower (it keeps the switch)."""
    return f"    out = is_value ? ({pointer})v_out0 : ({pointer})k_out0;\n    const unsigned int row_in_output = blockIdx.x;"


def _output_names(n_outputs: int) -> List[str]:
    return [f"k_out{i}" for i in range(n_outputs)] + [f"v_out{i}" for i in range(n_outputs)]


@functools.lru_cache(maxsize=None)
def _row_pair_kernel(n_outputs: int) -> PrecompiledKernel:
    return PrecompiledKernel(f"row_pair_gather_{n_outputs}", ["k_table", "v_table", "rows"], _output_names(n_outputs),
                             _ROW_PAIR_COPY.replace("OUTPUT_SWITCH", _output_switch(n_outputs, "void*")))


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def allocatable_bytes() -> int:
    """What MLX may still allocate: its memory limit less what its arrays hold now. MLX crashes, rather than
    raising, when it cannot get memory: requests sized by their caller are checked against this first."""
    return mx.get_memory_limit() - mx.get_active_memory()


def _row_words(table: mx.array) -> int:
    """16-byte words per row of ``table``, or 0 if its rows are not whole words."""
    row_bytes = table.itemsize * math.prod(table.shape[1:])
    return 0 if row_bytes % 16 else row_bytes // 16


def _copies_rows(k_table: mx.array, v_table: mx.array) -> bool:
    """Whether the row kernel runs here: on CUDA, for rows of whole 16-byte words."""
    return _on_cuda() and _row_words(k_table) > 0 and _row_words(v_table) > 0


def _launch_pairs(kernel, inputs: List[mx.array], template, rows: mx.array, n_outputs: int,
                  shapes: Tuple[Sequence[int], Sequence[int]], dtypes,
                  threads: int = _THREADS) -> List[Tuple[mx.array, mx.array]]:
    """One launch of a row kernel (one thread block of ``threads`` per row of ``rows``, keys and values as
    ``blockIdx.y``), the rows split evenly into ``n_outputs`` output pairs of ``shapes`` and ``dtypes``."""
    flat = rows.reshape(-1)
    outputs = kernel(
        inputs=[*inputs, flat],
        template=template,
        grid=(flat.size * threads, 2, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[tuple(shape) for shape in shapes for _ in range(n_outputs)],
        output_dtypes=[dtype for dtype in dtypes for _ in range(n_outputs)],
    )
    return list(zip(outputs[:n_outputs], outputs[n_outputs:]))


def _row_pairs(k_table: mx.array, v_table: mx.array, rows: mx.array, n_outputs: int,
               shapes: Tuple[Sequence[int], Sequence[int]]) -> List[Tuple[mx.array, mx.array]]:
    return _launch_pairs(_row_pair_kernel(n_outputs), [k_table, v_table],
                         [("K_VECS", _row_words(k_table)), ("V_VECS", _row_words(v_table))], rows, n_outputs,
                         shapes, (k_table.dtype, v_table.dtype))


_streams = threading.local()


def _second_stream() -> Optional[mx.Stream]:
    """On the CPU device, a second CPU stream of this thread (MLX streams belong to the thread that made
    them), whose thread works beside the default stream's: a gather's values are taken (or dequantized,
    or quantized) there while its keys are on the default stream. None elsewhere. MLX never frees a
    stream: each Python thread that rebuilds on CPU leaves two stream threads behind (its default
    stream's and this one's), so rebuild from long-lived threads, not one new thread per request."""
    if mx.default_device() != mx.cpu:
        return None
    stream = getattr(_streams, "cpu", None)
    if stream is None:
        stream = _streams.cpu = mx.new_stream(mx.cpu)
    return stream


def gather_row_pairs(k_table: mx.array, v_table: mx.array, rows: mx.array) -> Tuple[mx.array, mx.array]:
    """``(k_table[rows], v_table[rows])`` for contiguous tables ``[n_rows, *row_shape]`` and int32 ``rows``
    of any shape; each result is ``rows.shape + row_shape``."""
    if not _copies_rows(k_table, v_table):
        return mx.take(k_table, rows, axis=0), mx.take(v_table, rows, axis=0, stream=_second_stream())
    ((keys, values),) = _row_pairs(k_table, v_table, rows, 1, (rows.shape + k_table.shape[1:],
                                                               rows.shape + v_table.shape[1:]))
    return keys, values


def gather_row_pairs_apart(k_table: mx.array, v_table: mx.array, rows: mx.array, k_shape: Sequence[int],
                           v_shape: Sequence[int]) -> List[Tuple[mx.array, mx.array]]:
    """Per index ``i`` of ``rows``' first axis, ``(k_table[rows[i]], v_table[rows[i]])`` reshaped to
    ``k_shape`` and ``v_shape``, each array in a buffer of its own: MLX updates an array in place only if
    no other array shares its buffer (else it copies the whole buffer first), and the per-layer parts of
    one gather, split, share one. One kernel on CUDA, its outputs of those shapes already (no reshape
    per array); elsewhere a take per array."""
    if not _copies_rows(k_table, v_table):
        second = _second_stream()
        return [(mx.take(k_table, r, axis=0).reshape(k_shape),
                 mx.take(v_table, r, axis=0, stream=second).reshape(v_shape)) for r in rows]
    return _row_pairs(k_table, v_table, rows, rows.shape[0], (k_shape, v_shape))


# One thread block per (new block, head) row, keys and values in one launch: copies each slot of the
# row from its layer's source (token ``tok0 + slot``), zeroes the slots outside ``[lo, hi)``. Sources are
# read through their strides (views of a batch's buffers need no copy first): 16 bytes at a time where the
# last axis is contiguous and every row starts 16-byte aligned, else one element at a time. ``T`` is the
# same-size unsigned integer: only bits are moved. ROW: where the row's source, ``tok0``, ``lo``, ``hi`` and
# block id come from (a plan array, or a description: see :func:`write_described_blocks_in_place`).
# DESTINATION: the row's place in new output arrays, or in the pool's own arrays. A thread loads UNROLL words
# before it stores them: the compiler cannot move a load above a store through a pointer that may alias it (the
# pool's arrays come in as const inputs), so one word at a time keeps one load in flight per thread.
_PLAN_ROW = """
    const int source = plan[5 * block], tok0 = plan[5 * block + 1];
    const int lo = plan[5 * block + 2], hi = plan[5 * block + 3];
    [[maybe_unused]] const int64_t block_id = plan[5 * block + 4];  // new output arrays need no id
"""
# A store's writes described by a few numbers: its new blocks are one run of ids from ``desc[0]``, write after
# write, and write ``w`` has layout ``layouts[w]``, four numbers from ``desc[1 + 4 * layout]``: first block index,
# first token, token count, block count. They are the strides of a one-element view (``desc_strides``), which
# MLX passes by value in the launch: a plan array made per store is host memory the GPU must fetch first,
# which spread the kernel's p95 (H100, 8x30: 0.89 against 0.19 ms with a plan made once).
_DESCRIBED_ROW = """
    int source = 0, start = 0;
    for (;;) {
        const int n_blocks = (int)desc_strides[4 + 4 * layouts[source]];
        if (block < start + n_blocks) break;
        start += n_blocks;
        ++source;
    }
    const int layout = layouts[source];
    const int first_index = (int)desc_strides[1 + 4 * layout], first_token = (int)desc_strides[2 + 4 * layout];
    const int n_tokens = (int)desc_strides[3 + 4 * layout];
    const int tok0 = (first_index + block - start) * BLOCK_SIZE - first_token;
    const int lo = tok0 < 0 ? -tok0 : 0;
    const int hi = n_tokens - tok0 < BLOCK_SIZE ? n_tokens - tok0 : BLOCK_SIZE;
    const int64_t block_id = desc_strides[0] + block;
"""
_PACK_BLOCKS = """
    const int row = blockIdx.x;
    const int block = row / HEADS, head = row % HEADS;
ROW
    const bool is_value = blockIdx.y == 1;
    const int dim = is_value ? V_DIM : K_DIM;
    const T* src = nullptr;
    int64_t head_stride = 0, token_stride = 0, dim_stride = 0;
    switch (source) {
SOURCE_CASES
    }
    src += head * head_stride;
    T* out = DESTINATION;
    constexpr int PER_VEC = 16 / sizeof(T);
    const bool vectors = dim_stride == 1
        && ((reinterpret_cast<uintptr_t>(src) | (uintptr_t)(token_stride * sizeof(T))) % 16) == 0;
    if (vectors) {
        const int vecs = dim / PER_VEC, total = BLOCK_SIZE * vecs;
        uint4* dst = reinterpret_cast<uint4*>(out);
        for (int base = threadIdx.x; base < total; base += UNROLL * blockDim.x) {
            uint4 words[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int i = base + u * blockDim.x, slot = i / vecs;
                words[u] = (slot >= lo && slot < hi)  // hi <= BLOCK_SIZE: no word past the row is read
                    ? reinterpret_cast<const uint4*>(src + (int64_t)(tok0 + slot) * token_stride)[i % vecs]
                    : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int i = base + u * blockDim.x;
                if (i < total) dst[i] = words[u];
            }
        }
    } else {
        for (int i = threadIdx.x; i < BLOCK_SIZE * dim; i += blockDim.x) {
            const int slot = i / dim;
            out[i] = (slot >= lo && slot < hi) ? src[(int64_t)(tok0 + slot) * token_stride + (i % dim) * dim_stride]
                                               : T(0);
        }
    }
"""
_NEW_ROWS = "reinterpret_cast<T*>(is_value ? v_out : k_out) + (size_t)row * BLOCK_SIZE * dim"
# MLX hands a kernel its inputs as const pointers and knows nothing of writes through them: the pool writes only
# blocks that nothing reads (held once, just allocated), and evaluates the kernel before anything can read them.
_POOL_ROWS = ("const_cast<T*>(reinterpret_cast<const T*>(is_value ? v_pool : k_pool))"
              " + ((size_t)block_id * HEADS + head) * BLOCK_SIZE * dim")


STORE_UNROLL = 4
"""Words a store kernel's thread loads before storing them (:data:`_PACK_BLOCKS`)."""


def _pack_source(n_sources: int, destination: str, row: str = _PLAN_ROW, unroll: int = STORE_UNROLL) -> str:
    def case(i, name):
        return (f"src = reinterpret_cast<const T*>({name}); head_stride = {name}_strides[1]; "
                f"token_stride = {name}_strides[2]; dim_stride = {name}_strides[3];")
    cases = "\n".join(f"        case {i}: if (is_value) {{ {case(i, f'v{i}')} }} else {{ {case(i, f'k{i}')} }} break;"
                      for i in range(n_sources))
    return (_PACK_BLOCKS.replace("UNROLL", str(unroll)).replace("ROW", row).replace("SOURCE_CASES", cases)
            .replace("DESTINATION", destination))


def _source_names(n_sources: int) -> List[str]:
    return [f"k{i}" for i in range(n_sources)] + [f"v{i}" for i in range(n_sources)]


# Not ensure_row_contiguous: MLX would copy every strided source whole before the kernel reads a block of it.
@functools.lru_cache(maxsize=None)
def _pack_kernel(n_sources: int):
    return mx.fast.cuda_kernel(name=f"semantic_pack_blocks_{n_sources}", input_names=[*_source_names(n_sources), "plan"],
                               output_names=["k_out", "v_out"], source=_pack_source(n_sources, _NEW_ROWS),
                               ensure_row_contiguous=False)


@functools.lru_cache(maxsize=None)
def _write_in_place_kernel(n_sources: int):
    return mx.fast.cuda_kernel(name=f"semantic_write_blocks_{n_sources}",
                               input_names=[*_source_names(n_sources), "plan", "k_pool", "v_pool"],
                               output_names=["done"], source=_pack_source(n_sources, _POOL_ROWS),
                               ensure_row_contiguous=False)


@functools.lru_cache(maxsize=None)
def _write_described_kernel(n_sources: int, unroll: int = STORE_UNROLL):
    return mx.fast.cuda_kernel(name=f"semantic_write_described_blocks_{n_sources}_{unroll}",
                               input_names=[*_source_names(n_sources), "layouts", "desc", "k_pool", "v_pool"],
                               output_names=["done"],
                               source=_pack_source(n_sources, _POOL_ROWS, _DESCRIBED_ROW, unroll),
                               ensure_row_contiguous=False)


def packs_blocks(keys: mx.array, values: mx.array) -> bool:
    """Whether :func:`pack_blocks` and :func:`write_blocks_in_place` run here for sources (or pool arrays)
    like ``keys`` and ``values``."""
    return (_on_cuda() and keys.dtype == values.dtype and keys.itemsize in (1, 2, 4, 8)
            and (keys.shape[-1] * keys.itemsize) % 16 == 0 and (values.shape[-1] * values.itemsize) % 16 == 0)


def _pack_launch(kernel, sources: Sequence[Tuple[mx.array, mx.array]], n_blocks: int, block_size: int,
                 extra_inputs: List[mx.array], output_shapes, output_dtypes) -> List[mx.array]:
    keys, values = sources[0]
    heads = keys.shape[1]
    return kernel(
        inputs=[k for k, _ in sources] + [v for _, v in sources] + extra_inputs,
        template=[("T", _SAME_SIZE_UINT[keys.itemsize]), ("HEADS", heads), ("BLOCK_SIZE", block_size),
                  ("K_DIM", keys.shape[-1]), ("V_DIM", values.shape[-1])],
        grid=(n_blocks * heads * _THREADS, 2, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=output_shapes,
        output_dtypes=output_dtypes,
    )


def pack_blocks(sources: Sequence[Tuple[mx.array, mx.array]], plan: np.ndarray,
                block_size: int) -> Optional[Tuple[mx.array, mx.array]]:
    """New blocks ``[n, heads, block_size, dim]`` (keys, values) cut from ``sources`` (per source ``[1, heads,
    T, dim]`` keys and values, any strides) in one kernel, or ``None`` where this backend has no such kernel
    (the caller then writes each source's blocks itself). ``plan``, int32 ``[n, 5]``, has one row per new
    block: (source, the source token in its slot 0, the first and end slot holding data, and a block id that
    only :func:`write_blocks_in_place` reads); other slots are zeroed."""
    keys, values = sources[0]
    if not packs_blocks(keys, values):
        return None
    heads, n = keys.shape[1], len(plan)
    k_out, v_out = _pack_launch(_pack_kernel(len(sources)), sources, len(plan), block_size,
                                [mx.array(plan, dtype=mx.int32)],
                                [(n, heads, block_size, keys.shape[-1]), (n, heads, block_size, values.shape[-1])],
                                [keys.dtype, values.dtype])
    return k_out, v_out


def write_blocks_in_place(k_pool: mx.array, v_pool: mx.array, sources: Sequence[Tuple[mx.array, mx.array]],
                          plan: np.ndarray, block_size: int) -> mx.array:
    """:func:`pack_blocks`' blocks written straight into block ``plan[i, 4]`` of the pool's row-contiguous
    arrays ``[blocks, heads, block_size, dim]`` (CUDA only: see :func:`packs_blocks`). The arrays stay the
    same arrays, in the same memory: views of them (cached rebuilds) stay valid, and no other array is made.
    Returns the kernel's token output, queued (``mx.async_eval``): the writes are done once it is evaluated,
    and until then nothing may read the blocks or give them to anyone."""
    return _queued_pool_write(_write_in_place_kernel(len(sources)), sources, len(plan), block_size,
                              [mx.array(plan, dtype=mx.int32), k_pool, v_pool])


def _queued_pool_write(kernel, sources: Sequence[Tuple[mx.array, mx.array]], n_blocks: int, block_size: int,
                       inputs: List[mx.array]) -> mx.array:
    """A pool-writing kernel launched and queued (``mx.async_eval``); its one-byte token output returned."""
    (done,) = _pack_launch(kernel, sources, n_blocks, block_size, inputs, [(1,)], [mx.uint8])
    mx.async_eval(done)
    return done


MAX_DESCRIBED_LAYOUTS = 2
"""Write layouts a description carries (a full-attention one and a sliding window's): its view has one
dimension per number, and MLX's kernels take arrays of up to 10."""


def write_described_blocks_in_place(k_pool: mx.array, v_pool: mx.array,
                                    sources: Sequence[Tuple[mx.array, mx.array]], first_id: int,
                                    layouts: Tuple[int, ...], described: Sequence[Tuple[int, int, int, int]],
                                    block_size: int, unroll: int = STORE_UNROLL) -> mx.array:
    """:func:`write_blocks_in_place` of writes whose new blocks are ids ``first_id, first_id + 1, ...``, write
    after write, write ``w`` laid out as ``described[layouts[w]]``: ``(first block index, first token, token
    count, block count)``, as a plan row derives them (:func:`semantic.domain.services._plan_rows`). No
    plan array: the numbers travel in the launch (see ``_DESCRIBED_ROW``), ``layouts`` in an array made once
    per distinct tuple. ``unroll``: see :data:`STORE_UNROLL` (other values for ``experiments.gpu_kernel_choices``)."""
    numbers = (first_id, *itertools.chain.from_iterable(described))
    desc = mx.as_strided(_one_int(), (1,) * len(numbers), numbers)
    n_blocks = sum(described[layout][3] for layout in layouts)
    return _queued_pool_write(_write_described_kernel(len(sources), unroll), sources, n_blocks, block_size,
                              [_layout_array(layouts), desc, k_pool, v_pool])


def compile_store_kernels(dtype: mx.Dtype, heads: int, k_dim: int, v_dim: int, block_size: int, n_layers: int, *,
                          into_pool: bool) -> bool:
    """Compile, on CUDA, the kernel a store of ``n_layers`` layers launches (into a dense pool's arrays,
    ``into_pool``, or as new blocks for a quantized pool), by launching it once on a one-block scratch pool.
    MLX compiles a custom kernel at its first launch in every process and keeps no copy on disk (1.4-2.3 s
    on an H100: ``experiments/results/h200/session-2026-12-07i/``); these kernels read strided sources
    through ``{name}_strides``, which only MLX's own compile passes, so NVRTC cannot build them here. Returns
    whether a kernel was launched (False off CUDA, or where a pool of this geometry has no such kernel)."""
    if not _on_cuda():  # no arrays made: an engine built on a CPU or Metal host does no MLX work for this
        return False
    source = mx.zeros((1, heads, block_size, k_dim), dtype), mx.zeros((1, heads, block_size, v_dim), dtype)
    if not packs_blocks(*source):
        return False
    sources = [source] * n_layers
    if into_pool:  # every layer's write but the first has no block: one block written in all
        done = write_described_blocks_in_place(mx.zeros_like(source[0]), mx.zeros_like(source[1]), sources, 0,
                                               (0,) + (1,) * (n_layers - 1),
                                               ((0, 0, block_size, 1), (0, 0, 0, 0)), block_size)
        mx.eval(done)
    else:
        mx.eval(pack_blocks(sources, np.array([[0, 0, 0, block_size, 0]], np.int32), block_size))
    return True


@functools.lru_cache(maxsize=None)
def _one_int() -> mx.array:
    """The element every description views (its value is never read)."""
    one = mx.zeros((1,), mx.int32)
    mx.eval(one)
    return one


@functools.lru_cache(maxsize=64)
def _layout_array(layouts: Tuple[int, ...]) -> mx.array:
    """``layouts`` on the device, made once: a store of every layer passes the same tuple each time."""
    array = mx.array(layouts, dtype=mx.int32)
    mx.eval(array)
    return array


_SAME_SIZE_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def word_view(array: mx.array) -> mx.array:
    """``array`` viewed as the widest unsigned integers (at most 8 bytes) that tile its last axis. MLX
    copies a slice update a few elements per thread, so 8-byte words move four times the bytes per
    thread of bfloat16 ones. Free for a row-contiguous array; a strided one would be copied first."""
    row_bytes = array.shape[-1] * array.itemsize
    size = next(size for size in (8, 4, 2, 1) if row_bytes % size == 0)
    return array if size <= array.itemsize else array.view(_SAME_SIZE_UINT[size])


def writes_through_host() -> bool:
    """On the CPU device, blocks are written through a NumPy view of the pool's arrays: MLX's CPU
    scatter moved ~0.2 GB/s where a NumPy row copy runs at memory speed."""
    return mx.default_device() == mx.cpu


def host_source(array: mx.array) -> mx.array:
    """``array`` reinterpreted as same-size unsigned ints, for :func:`host_view`; evaluate many of
    these in one ``mx.eval`` (an evaluation per array costs ~20 us)."""
    return array.view(_SAME_SIZE_UINT[array.itemsize])


def host_views(arrays: Sequence[mx.array]) -> List[np.ndarray]:
    """:func:`host_view` of each of ``arrays``, evaluated together. A row-contiguous array is read through
    Python's buffer protocol, which needs no MLX operation: every operation, a view included, is a
    hand-off to MLX's CPU thread (~15 us each, milliseconds for a store's 60 arrays on a loaded machine).
    Strided arrays (slices of a longer buffer) still go through an MLX view, all in one evaluation."""
    mx.eval(arrays)  # nothing to do for the evaluated arrays a store usually gets
    views: List[Optional[np.ndarray]] = [None] * len(arrays)
    strided = []
    for i, array in enumerate(arrays):
        buffer = memoryview(array)
        if not array.size:  # a memoryview of zeros in its shape cannot be cast
            views[i] = np.empty(array.shape, dtype=f"u{array.itemsize}")
        elif buffer.c_contiguous:
            views[i] = np.frombuffer(buffer.cast("B"), dtype=f"u{array.itemsize}").reshape(array.shape)
        else:
            strided.append(i)
    sources = [host_source(arrays[i]) for i in strided]
    mx.eval(sources)
    for i, source in zip(strided, sources):
        views[i] = np.array(source, copy=False)
    return views


_HOST_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
_PARALLEL_COPY_BYTES = 8 << 20
_PARALLEL_ITEM_BYTES = 512 << 10
"""Copies of fewer bytes in all, or per item, stay on one thread: there the items' Python (slicing the
views) outweighs their copies, and threads taking turns on the GIL made stores slower, not faster."""
_copy_pool: Optional[ThreadPoolExecutor] = None
_copy_pool_lock = threading.Lock()


def _forget_copy_threads() -> None:
    """In a forked child: the parent's threads are not there, and its lock may have been held."""
    global _copy_pool, _copy_pool_lock
    _copy_pool, _copy_pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_copy_threads)


def split_host_copies(copy: Callable[[T], None], items: Sequence[T], nbytes: int) -> None:
    """``copy(item)`` for each of ``items``, which write ``nbytes`` in all, to memory no other item writes.
    From ``_PARALLEL_COPY_BYTES`` in all and ``_PARALLEL_ITEM_BYTES`` per item on, the calling thread and
    up to three more (four in all at most, the machine's cores) take the items in turn, as each finishes
    its last: ``copy`` must release the GIL while it moves bytes, as NumPy's copies do. One thread reads a
    store's sources, many separate arrays, at ~0.5x memcpy speed. Stores on a 2-core machine (smollm2-135m
    geometry, p50 of 300, three runs; ``experiments/results/cpu-store-threads/``): 4 blocks x 24 layers
    (18 MiB) 1.53-1.61 ms -> 1.01-1.06, 8 x 30 3.79-4.49 -> 2.92-3.03, 16 x 30 7.37-8.76 -> 5.67-5.88
    (one run of the new side was slower, 4.77 and 8.49); memcpy of the same bytes 0.69-0.89, 2.31-3.14,
    5.44-6.95. Forced on below the thresholds, two threads lost where layers are small (1 x 12: 0.21 ->
    0.46-0.48 ms; 2 x 16: 0.42-0.43 -> 0.47-0.49) and gained little in between (2 x 24: 0.66-0.69 ->
    0.61-0.66; ``threshold_sweep.txt`` there).

    Returns once no thread is copying any more, also when a copy raised or this thread was interrupted
    (the memory may be reused at once); then raises the first error. No item is taken after an error."""
    if (_HOST_COPY_THREADS == 1 or len(items) < 2 or nbytes < _PARALLEL_COPY_BYTES
            or nbytes < _PARALLEL_ITEM_BYTES * len(items)):
        for item in items:
            copy(item)
        return
    queue = iter(items)
    turn = threading.Condition()  # guards the queue, ``busy``, ``errors`` and ``stop``
    busy, errors, stop = [0], [], [False]  # busy: items copy threads are copying

    def take(counted: bool) -> object:
        """The next item (``queue`` once none is left, or after an error or a stop); ``counted``: in ``busy``."""
        with turn:
            item = queue if stop[0] or errors else next(queue, queue)
            if counted and item is not queue:
                busy[0] += 1
            return item

    def take_in_turn() -> None:  # a copy thread's; no signal interrupts it (they go to the main thread)
        for item in iter(lambda: take(True), queue):
            try:
                copy(item)
            except BaseException as error:  # handed to the calling thread, which raises it
                with turn:
                    errors.append(error)
            finally:
                with turn:
                    busy[0] -= 1
                    turn.notify_all()

    try:
        pool = _copy_executor()
        for _ in range(min(_HOST_COPY_THREADS, len(items)) - 1):
            try:
                pool.submit(take_in_turn)
            except RuntimeError:  # the interpreter is shutting down: the calling thread copies everything
                break
        for item in iter(lambda: take(False), queue):
            copy(item)
    except BaseException as error:  # a copy of this thread's, or an interrupt (Ctrl-C) anywhere in here
        errors.insert(0, error)
    finally:
        stop[0] = True  # one store: the copy threads take nothing more, whatever interrupted this thread
        _wait_uninterrupted(turn, lambda: busy[0] == 0)
    if errors:
        raise errors[0]


def _wait_uninterrupted(condition: threading.Condition, predicate: Callable[[], bool]) -> None:
    """``condition.wait_for(predicate)``, waiting on through interruptions (raised once it holds)."""
    interrupted = None
    while True:
        try:
            with condition:
                condition.wait_for(predicate)
            break
        except BaseException as error:
            interrupted = error
    if interrupted is not None:
        raise interrupted


def _copy_executor() -> ThreadPoolExecutor:
    """The copy threads, made on first use."""
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(_HOST_COPY_THREADS - 1, thread_name_prefix="semantic-host-copy")
        return _copy_pool


def host_view(array: mx.array) -> np.ndarray:
    """A NumPy view sharing ``array``'s memory (evaluated first), its elements as same-size unsigned
    ints so bfloat16 needs no NumPy support. Writes through it change ``array`` in place: only for
    arrays no computation still reads (the pool writes only blocks nothing refers to)."""
    if array.dtype not in _SAME_SIZE_UINT.values():
        array = host_source(array)
    return np.array(array, copy=False)


# One thread block per gathered (block, head) row, keys and values in one launch: each thread turns packed
# 32-bit words into PACK values each with the arithmetic of MLX's own affine dequantize kernel (``scale * T(q) +
# bias`` in the scales' type), so the result is bit-identical to ``mx.dequantize``. A thread loads UNROLL words
# (and their scales and biases) before it stores any: with one word in flight per thread, an H100 dequantized a
# 3 GiB context no faster than the dense gather copies it (2.5-2.9 against 2.7 ms); with four, 1.84. On an H200
# both ran at 1.43 ms (``experiments.gpu_kernel_choices``, part ``dequantize``). Two values per instruction
# (bfloat16 pairs, q made without a conversion) and streaming stores bought nothing on either GPU. 512 threads
# per row ran 1-2 % faster than 256 on an H100 (2026-12-06), once the kernel lost its output switch.
_DEQUANTIZE_THREADS = 512
_DEQUANTIZE_ROWS = """
    constexpr int PACK = 32 / BITS;
    constexpr int UNROLL = 4;
    const bool is_value = blockIdx.y == 1;
    const int words = is_value ? V_WORDS : K_WORDS;  // packed words per token slot
    const int groups = is_value ? V_GROUPS : K_GROUPS;
    const size_t row = rows[blockIdx.x];
    const uint32_t* __restrict__ packed = (is_value ? v_packed : k_packed) + row * BLOCK_SIZE * words;
    const T* __restrict__ scales = (is_value ? v_scales : k_scales) + row * BLOCK_SIZE * groups;
    const T* __restrict__ biases = (is_value ? v_biases : k_biases) + row * BLOCK_SIZE * groups;
    T* out = nullptr;
OUTPUT_SWITCH
    T* __restrict__ dst = out + (size_t)row_in_output * BLOCK_SIZE * words * PACK;
    struct alignas(sizeof(T) * PACK >= 16 ? 16 : sizeof(T) * PACK) Values { T v[PACK]; };
    const int total = BLOCK_SIZE * words;
    for (int base = threadIdx.x; base < total; base += UNROLL * blockDim.x) {
        uint32_t bits[UNROLL];
        T scale[UNROLL], bias[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = base + u * blockDim.x;  // word i of the row: consecutive threads, consecutive words
            if (i < total) {
                const int group = (i / words) * groups + (i % words) * PACK / GROUP_SIZE;
                bits[u] = packed[i];
                scale[u] = scales[group];
                bias[u] = biases[group];
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const int i = base + u * blockDim.x;
            if (i < total) {
                Values values;
#pragma unroll
                for (int j = 0; j < PACK; j++) {
                    const uint8_t q = (bits[u] >> (BITS * j)) & ((1u << BITS) - 1);
                    values.v[j] = scale[u] * static_cast<T>(q) + bias[u];
                }
                *reinterpret_cast<Values*>(dst + (size_t)i * PACK) = values;
            }
        }
    }
"""


@functools.lru_cache(maxsize=None)
def _dequantize_rows_kernel(n_outputs: int) -> PrecompiledKernel:
    return PrecompiledKernel(f"dequantize_rows_{n_outputs}",
                             ["k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases", "rows"],
                             _output_names(n_outputs), dequantize_rows_source(n_outputs))


def dequantize_rows_source(n_outputs: int) -> str:
    """The dequantizing row kernel's source for ``n_outputs`` output pairs."""
    return _DEQUANTIZE_ROWS.replace("OUTPUT_SWITCH", _one_output("T*") if n_outputs == 1 else
                                    _output_switch(n_outputs, "T*"))


QuantizedTables = Tuple[mx.array, mx.array, mx.array]
"""``(packed, scales, biases)`` of one quantized array, each ``[n_rows, tokens, width]``."""


def _dequantizes_rows(bits: int) -> bool:
    return _on_cuda() and bits in (2, 4, 8)


def _dequantized_dims(keys: QuantizedTables, values: QuantizedTables, bits: int) -> Tuple[int, int]:
    return keys[0].shape[-1] * 32 // bits, values[0].shape[-1] * 32 // bits


def _dequantized_rows(keys: QuantizedTables, values: QuantizedTables, rows: mx.array, n_outputs: int,
                      shapes: Tuple[Sequence[int], Sequence[int]], group_size: int,
                      bits: int) -> List[Tuple[mx.array, mx.array]]:
    dtype = keys[1].dtype
    template = [("T", dtype), ("BITS", bits), ("GROUP_SIZE", group_size), ("BLOCK_SIZE", keys[0].shape[1]),
                ("K_WORDS", keys[0].shape[-1]), ("V_WORDS", values[0].shape[-1]),
                ("K_GROUPS", keys[1].shape[-1]), ("V_GROUPS", values[1].shape[-1])]
    return _launch_pairs(_dequantize_rows_kernel(n_outputs), [*keys, *values], template, rows, n_outputs, shapes,
                         (dtype, dtype), _DEQUANTIZE_THREADS)


def gather_dequantized_pairs(keys: QuantizedTables, values: QuantizedTables, rows: mx.array, *, group_size: int,
                             bits: int) -> Tuple[mx.array, mx.array]:
    """``mx.dequantize`` of rows ``rows`` of the keys' and of the values' tables (gathered like
    ``gather_row_pairs``'s tables); each result is ``rows.shape + (tokens, head_dim)`` in the scales' dtype.

    On CUDA one kernel reads the packed rows and writes the dense cache (one pass, keys and values in
    the same launch); elsewhere three row gathers and one dequantize per table (on CPU the values' on a
    second stream).
    """
    if not _dequantizes_rows(bits):
        return (_dequantized_take(keys, rows, group_size, bits),
                _dequantized_take(values, rows, group_size, bits, _second_stream()))
    tokens = keys[0].shape[1]
    shapes = tuple(rows.shape + (tokens, dim) for dim in _dequantized_dims(keys, values, bits))
    ((k_out, v_out),) = _dequantized_rows(keys, values, rows, 1, shapes, group_size, bits)
    return k_out, v_out


def gather_dequantized_pairs_apart(keys: QuantizedTables, values: QuantizedTables, rows: mx.array,
                                   k_shape: Sequence[int], v_shape: Sequence[int], *, group_size: int,
                                   bits: int) -> List[Tuple[mx.array, mx.array]]:
    """:func:`gather_dequantized_pairs` of each ``rows[i]``, reshaped to ``k_shape`` and ``v_shape``, each
    array in a buffer of its own (see :func:`gather_row_pairs_apart`): one kernel on CUDA, elsewhere a
    dequantize per array."""
    if not _dequantizes_rows(bits):
        second = _second_stream()
        return [(_dequantized_take(keys, r, group_size, bits).reshape(k_shape),
                 _dequantized_take(values, r, group_size, bits, second).reshape(v_shape)) for r in rows]
    return _dequantized_rows(keys, values, rows, rows.shape[0], (k_shape, v_shape), group_size, bits)


def quantize_pair(keys: mx.array, values: mx.array, *, group_size: int, bits: int) -> List[mx.array]:
    """``mx.quantize`` of keys and of values (lazy): keys' packed words, scales and biases, then values'. On
    CPU the values' on a second stream, beside the keys' (MLX's CPU quantize runs on one thread)."""
    return [*mx.quantize(keys, group_size=group_size, bits=bits),
            *mx.quantize(values, group_size=group_size, bits=bits, stream=_second_stream())]


def _dequantized_take(tables: QuantizedTables, rows: mx.array, group_size: int, bits: int,
                      stream: Optional[mx.Stream] = None) -> mx.array:
    """The portable path: gather the packed rows, then ``mx.dequantize``; on ``stream`` if given (on CPU the
    values' go to a second stream, whose thread works beside the keys': MLX's CPU dequantize runs on one thread)."""
    return mx.dequantize(*(mx.take(table, rows, axis=0, stream=stream) for table in tables), group_size=group_size,
                         bits=bits, stream=stream)
