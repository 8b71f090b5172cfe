"""Storage of a pool whose blocks are quantized at rest (``BlockFormat`` with ``bits``).

Six arrays of ``[total_blocks, n_kv_heads, block_size, width]``: keys' packed
words, scales and biases, then values' (``ModelCacheSpec.stored_parts``).
Rebuilding gathers the packed rows with the same row index the dense pool uses
and dequantizes them into the cache layout (``mlx_kernels.gather_dequantized_pairs``: one kernel on CUDA);
storing quantizes each token once and writes whole packed blocks. On CUDA the pool cuts every new block
out of its sources in one kernel and quantizes them all at once (``BlockPool._write_packed``); elsewhere
:meth:`write_many` quantizes each write's tokens (one ``mx.quantize`` per keys/values, evaluated together).

The pool (``services.BlockPool``) keeps the bookkeeping and its lock; this class
only touches the arrays, always under that lock.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from semantic.adapters.mlx_kernels import (gather_dequantized_pairs, gather_dequantized_pairs_apart, host_view,
                                           quantize_pair, writes_through_host)
from semantic.domain.value_objects import ModelCacheSpec

StoredWrite = Tuple[Sequence[int], int, Sequence[mx.array], int]
"""``(block_ids, first_index, parts, first_token)``: ``parts`` in ``stored_parts`` order, each
``[1, heads, T, width]`` holding token positions ``[first_token, first_token + T)``."""

RowCopy = Tuple[int, int, int, int]
"""``(to_block, from_block, first_slot, end_slot)``: copy those token slots of every stored part."""


class QuantizedArenas:
    """The arrays of a quantized pool and the reads and writes on them."""

    def __init__(self, spec: ModelCacheSpec, total_blocks: int):
        self.spec = spec
        self.format = spec.block_format
        shape = (total_blocks, spec.n_kv_heads, spec.block_size)
        self.arenas = [mx.zeros(shape + (part.width,), dtype=getattr(mx, part.dtype)) for part in spec.stored_parts]
        mx.eval(self.arenas)
        self._host_views: Optional[List[np.ndarray]] = None

    def _writable(self) -> Tuple[bool, list]:
        """Whether writes go through the host, and the arrays to write into. The NumPy views are made once
        (an evaluation each): the arrays are written only through them, so their buffers never change."""
        if not writes_through_host():
            return False, self.arenas
        if self._host_views is None:
            self._host_views = [host_view(a) for a in self.arenas]
        return True, self._host_views

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arenas)

    # ---- quantize / dequantize ----------------------------------------------------------------
    def quantize(self, keys: mx.array, values: mx.array) -> List[mx.array]:
        """``mx.quantize`` of keys and of values (lazy), as the six stored parts."""
        return quantize_pair(keys, values, group_size=self.format.group_size, bits=self.format.bits)

    def dequantize(self, parts: Sequence[mx.array]) -> Tuple[mx.array, mx.array]:
        """Keys and values of six stored parts (any leading shape)."""
        fmt = self.format
        return tuple(mx.dequantize(*parts[i:i + 3], group_size=fmt.group_size, bits=fmt.bits) for i in (0, 3))

    # ---- reads --------------------------------------------------------------------------------
    def block(self, block_id: int) -> Tuple[mx.array, mx.array]:
        """One block's keys and values, dequantized, ``[heads, block_size, dim]``."""
        return self.dequantize([a[block_id] for a in self.arenas])

    def _row_tables(self) -> List[mx.array]:
        return [a.reshape(-1, self.spec.block_size, a.shape[-1]) for a in self.arenas]

    def gather(self, rows: mx.array) -> Tuple[mx.array, mx.array]:
        """Dequantized keys and values of ``rows`` (``[layers, heads, n_blocks]`` indices of
        ``[blocks * heads]`` rows), each ``[layers, heads, n_blocks * block_size, dim]`` (lazy)."""
        tables = self._row_tables()
        n_layers, heads, n_blocks = rows.shape
        keys, values = gather_dequantized_pairs(tuple(tables[:3]), tuple(tables[3:]), rows,
                                                group_size=self.format.group_size, bits=self.format.bits)
        tokens = n_blocks * self.spec.block_size
        return (keys.reshape(n_layers, heads, tokens, keys.shape[-1]),
                values.reshape(n_layers, heads, tokens, values.shape[-1]))

    def gather_apart(self, rows: mx.array, k_shape: Sequence[int],
                     v_shape: Sequence[int]) -> List[Tuple[mx.array, mx.array]]:
        """:meth:`gather` per layer, reshaped to ``k_shape`` and ``v_shape``, each array in a buffer of its
        own (``BlockPool.gather_apart``)."""
        tables = self._row_tables()
        return gather_dequantized_pairs_apart(tuple(tables[:3]), tuple(tables[3:]), rows, k_shape, v_shape,
                                              group_size=self.format.group_size, bits=self.format.bits)

    def gather_stored(self, rows: mx.array) -> List[mx.array]:
        """The packed parts of ``rows`` as stored, each ``[layers, heads, n_blocks * block_size, width]`` (lazy)."""
        n_layers, heads, n_blocks = rows.shape
        tokens = n_blocks * self.spec.block_size
        return [mx.take(table, rows, axis=0).reshape(n_layers, heads, tokens, table.shape[-1])
                for table in self._row_tables()]

    # ---- writes -------------------------------------------------------------------------------
    def write_many(self, writes: Iterable[Tuple[Sequence[int], int, mx.array, mx.array, int, int]]) -> None:
        """``BlockPool.write_many`` for this format: quantize the tokens each write's blocks hold, then store them."""
        stored = []
        for ids, first_index, keys, values, first_token, n_tokens in writes:
            (keys, values), start = self._clip((keys, values), first_index, len(ids), first_token, n_tokens)
            stored.append((ids, first_index, self.quantize(keys, values), start))
        self.write_stored(stored)

    def _clip(self, parts: Sequence[mx.array], first_index: int, n_blocks: int, first_token: int,
              n_tokens: int) -> Tuple[List[mx.array], int]:
        """The tokens of ``parts`` (``n_tokens`` of them from position ``first_token``) that blocks
        ``first_index`` .. ``first_index + n_blocks - 1`` cover, and the first one's position."""
        size = self.spec.block_size
        start = max(first_token, first_index * size)
        end = min(first_token + n_tokens, (first_index + n_blocks) * size)
        return [p[:, :, start - first_token:end - first_token] for p in parts], start

    def write_stored(self, writes: Iterable[StoredWrite]) -> None:
        """Write already quantized parts into fresh blocks (evaluated on return); slots outside the
        data are zeroed (they dequantize to 0), so no earlier owner's data survives in a block."""
        size = self.spec.block_size
        planned = []
        for block_ids, first_index, parts, first_token in writes:
            n_blocks = len(block_ids)
            if not n_blocks:  # no tokens either (checked): NumPy takes an empty id list for float indices
                continue
            parts, first_token = self._clip(parts, first_index, n_blocks, first_token, parts[0].shape[2])
            before = first_token - first_index * size
            padded = []
            for part in parts:
                after = n_blocks * size - before - part.shape[2]
                padded.append(mx.pad(part[0], [(0, 0), (before, after), (0, 0)]) if before or after else part[0])
            planned.append((list(block_ids), padded))
        mx.eval([p for _, padded in planned for p in padded])
        host, arenas = self._writable()
        for block_ids, padded in planned:
            for arena, data in zip(arenas, padded):
                heads, width = data.shape[0], data.shape[-1]
                if host:  # see mlx_kernels.writes_through_host
                    blocks = host_view(data).reshape(heads, len(block_ids), size, width).transpose(1, 0, 2, 3)
                    arena[np.asarray(block_ids)] = blocks
                else:
                    arena[mx.array(block_ids)] = data.reshape(heads, len(block_ids), size, width).transpose(1, 0, 2, 3)
        if not host:
            mx.eval(self.arenas)

    def copy_rows(self, copies: Sequence[RowCopy]) -> None:
        """Copy token slots between blocks packed, so a token is never quantized twice."""
        if not copies:
            return
        host, arenas = self._writable()
        for to_block, from_block, lo, hi in copies:
            for arena in arenas:
                arena[to_block, :, lo:hi] = arena[from_block, :, lo:hi]
        if not host:
            mx.eval(self.arenas)
