"""Conversions between pool blocks and mlx-lm cache objects, without a model.

``blocks_to_cache`` rebuilds the caches the model's ``make_cache`` would hold
after the same tokens; ``cache_to_blocks`` stores caches as blocks, sharing the
blocks a source context already holds instead of copying them.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.domain.entities import AgentBlocks
from semantic.domain.errors import IncompatibleCacheError, InvalidRequestError
from semantic.domain.request_checks import all_non_negative, checked_int, int_items, length, plain_ints
from semantic.domain.services import BlockPool, GatherRows, Reservation
from semantic.domain.value_objects import ModelCacheSpec


def layer_ids_for(spec: ModelCacheSpec, handle: AgentBlocks, layer: int, n_tokens: int) -> Tuple[int, ...]:
    """The handle's blocks a layer needs for its first ``n_tokens`` tokens. Checked token by token: a sliding
    window starting inside a block the handle holds may need slots of it that the handle's window had
    already left (zeros)."""
    have_first, _ = spec.layer_block_range(layer, handle.num_tokens)
    first, last = spec.layer_block_range(layer, n_tokens)
    ids = handle.layer_block_ids(layer)
    wanted, kept = spec.visible_range(layer, n_tokens), spec.visible_range(layer, handle.num_tokens)
    if wanted[0] < kept[0] or last - have_first > len(ids):
        raise IncompatibleCacheError(f"layer {layer} no longer holds tokens {wanted} (its sliding window kept {kept})")
    return ids[first - have_first : last - have_first]


def can_trim(spec: ModelCacheSpec, handle: AgentBlocks, n_tokens: int) -> bool:
    """Whether every layer of ``handle`` still holds what a context of its first ``n_tokens`` needs."""
    if not (isinstance(spec, ModelCacheSpec) and isinstance(handle, AgentBlocks)):
        raise InvalidRequestError(f"can_trim takes a ModelCacheSpec and an AgentBlocks, got {type(spec).__name__} "
                                  f"and {type(handle).__name__}")
    if type(n_tokens) is not int:  # a str or None raised a bare TypeError, a float gave an answer
        n_tokens = checked_int("n_tokens", n_tokens, -2**63)  # a negative one answered below, as a plain int's
    if not 0 <= n_tokens <= handle.num_tokens:
        return False
    return all(
        spec.visible_range(layer, n_tokens)[0] >= spec.visible_range(layer, handle.num_tokens)[0]
        or n_tokens == 0
        for layer in spec.sliding_window_layers
    )


@dataclass(frozen=True)
class _GatherGroup:
    """Layers that keep the same blocks count, rebuilt together, and the slots ``[lo, hi)`` the caches keep of
    their blocks' tokens. ``rows``: the row index of one gather (made once per handle and length, since
    handles are immutable). ``view_ids``: instead, when each layer needs exactly one block of a dense pool,
    that block per layer, whose arrays the caches view without a copy."""

    window: Optional[int]
    layers: Tuple[int, ...]
    rows: Optional[GatherRows]
    view_ids: Optional[Tuple[int, ...]]
    lo: int
    hi: int


def _rebuilds_as_views(spec: ModelCacheSpec, blocks_per_layer: int) -> bool:
    """Whether a group's caches can view the pool's arrays: one dense block per layer is already the
    contiguous ``[heads, block_size, dim]`` a cache holds (more blocks need a gather to be contiguous)."""
    return blocks_per_layer == 1 and not spec.block_format.quantized


def _gather_plan(pool: BlockPool, handle: AgentBlocks, n_tokens: int, views: bool,
                 held_blocks: int) -> Tuple[_GatherGroup, ...]:
    spec = pool.spec
    groups: Dict[Optional[int], List[int]] = defaultdict(list)
    for layer, window in enumerate(spec.layer_windows):
        groups[window].append(layer)
    plan = []
    for window, layers in groups.items():
        ids = [layer_ids_for(spec, handle, layer, n_tokens) for layer in layers]
        first_block, last_block = spec.layer_block_range(layers[0], n_tokens)
        start, end = spec.visible_range(layers[0], n_tokens)
        if window is None:  # a KVCache keeps whole blocks, like one after a prefill, ``held_blocks`` with room
            spare = held_blocks - last_block
            ids = [(*layer_ids, *(layer_ids[-1:] * spare)) for layer_ids in ids]  # slots past its tokens: unread
            lo, hi = 0, (last_block + spare) * spec.block_size
        else:  # the rotating cache holds exactly the visible tokens
            lo, hi = start - first_block * spec.block_size, end - first_block * spec.block_size
        if views and _rebuilds_as_views(spec, len(ids[0])):
            plan.append(_GatherGroup(window, tuple(layers), None, tuple(b for (b,) in ids), lo, hi))
        else:
            plan.append(_GatherGroup(window, tuple(layers), pool.gather_rows(ids), None, lo, hi))
    return tuple(plan)


def _check_pool(pool) -> None:
    if not isinstance(pool, BlockPool):
        raise InvalidRequestError(f"pool must be a BlockPool, got {type(pool).__name__}")


def blocks_to_cache(pool: BlockPool, handle: AgentBlocks, n_tokens: Optional[int] = None, *,
                    views: bool = True, room: int = 0) -> List[adapter.LayerCache]:
    """Rebuild one evaluated cache object per layer from ``handle``'s first ``n_tokens`` tokens (default all).

    ``room``: tokens the caller will add before generating (its prompt). Full-attention layers get whole
    blocks with space for them, as a prefill of the same tokens would leave the buffer, so mlx-lm's
    batch, which takes a lone rebuilt cache's arrays as they are (``adapter.merge_keeping_arrays``),
    need not grow it (zeros and a concatenate per layer) at the first prompt token; and each such layer's
    keys and values get a buffer of their own (``BlockPool.gather_apart``), which the batch then writes
    in place: the rebuild is the only copy. Without room, a group's layers are views of one gather,
    which MLX would copy whole at the first update.

    Layers that keep the same blocks count are rebuilt together: one gather kernel for keys and values
    per group (all full-attention layers form one group, the sliding-window layers of one window
    another), whatever the block count (on CUDA also with room; elsewhere a take per array then). The
    kernels are queued (``mx.async_eval``) before the per-layer views and cache objects are made: the
    device copies while Python builds them (H200, 8x30: p50 0.33 -> 0.24 ms; H100, 32x48: 2.46 -> 2.41).

    Views. A group whose layers each need exactly one block of a dense pool copies nothing: each cache
    holds slices of the pool's arrays (``[block : block + 1]``, cut to the visible slots of a sliding
    window), which share the pool's memory, so such a rebuild launches no kernel. mlx-lm copies every
    inserted cache into its batch at the next prefill (``BatchKVCache.merge``), which is the one copy
    the hot path pays too. Why it is safe:

    * The pool writes only blocks nobody references, in place (on CPU through NumPy views of its
      arrays, on CUDA by a kernel writing into them). Every cache holding views therefore holds a
      reference on the handle's blocks (a ``BlockPin``, also kept by copies of the cache), released
      when the last of these caches is garbage-collected; until then none of its blocks is freed, so
      none is written.
    * mlx-lm never writes into a cache's arrays: ``update_and_fetch`` and its batch merge make new
      arrays (an MLX slice update of an array whose buffer another array shares copies it first), and
      rebind only that cache's handle on them (each rebuild gets new handles on views the pool keeps).
    * The reference goes with the cache objects, not with lazy computations on their arrays: evaluate
      what reads them (mlx-lm's merge is evaluated at the prefill that follows it) before dropping
      the caches *and* the handle. The engine holds each request's source handle until it completes.
    * Cost, not correctness: where a store replaces the pool's arrays (``BlockPool.writes_in_place``
      is False: Metal), a live view keeps MLX from updating them in place, so a store
      while it lives copies the whole pool array. There, drop rebuilt caches once used (the engine
      hands them to mlx-lm, which keeps none after merging them into its batch, and asks for views
      only when that merge comes before its next stores), or pass ``views=False``.

    Quantized pools always dequantize (a copy); so do groups needing more than one block per layer,
    and every group with ``views=False``.
    """
    _check_pool(pool)
    pool.check_handle(handle)
    room = checked_int("room", room, 0)
    n_tokens = handle.num_tokens if n_tokens is None else checked_int("n_tokens", n_tokens, 0, handle.num_tokens)
    # room sizes the caches: bound it before MLX allocates them (the handle's own tokens fit the pool)
    if room and (needed := pool.spec.blocks_per_agent(n_tokens + room)) > pool.total_blocks:
        raise InvalidRequestError(
            f"room={room}: a context of {n_tokens + room} tokens needs {needed} blocks, more than this pool's "
            f"{pool.total_blocks}; it could never be stored (pass the prompt's length)")
    held_blocks = pool.spec.blocks_for_tokens(n_tokens + room)  # prompts of any length within: one plan
    if n_tokens == 0:
        return [adapter.empty_layer_cache(window) for window in pool.spec.layer_windows]
    plan = handle.memo(("gather", n_tokens, views, held_blocks),
                       lambda: _gather_plan(pool, handle, n_tokens, views, held_blocks))
    pin = pool.pin(handle) if any(group.view_ids is not None for group in plan) else None

    caches: List[Optional[adapter.LayerCache]] = [None] * pool.spec.n_layers
    with pool.storage_lock:
        pool.check_handle(handle)  # again, under the lock: released since, its blocks may hold another's data
        gathered = iter([_gathered_layers(pool, group, apart=room > 0 and group.window is None)
                         for group in plan if group.view_ids is None])
        for group in plan:
            if group.view_ids is not None:
                pairs = pool.block_views(group.view_ids, group.lo, group.hi)
                for layer, (layer_keys, layer_values) in zip(group.layers, pairs):
                    caches[layer] = adapter.build_layer_cache(group.window, layer_keys, layer_values, n_tokens,
                                                              keep_alive=pin)
                continue
            for layer, (layer_keys, layer_values) in zip(group.layers, next(gathered)):
                caches[layer] = adapter.build_layer_cache(group.window, layer_keys, layer_values, n_tokens,
                                                          own_arrays=True)
        # One evaluation for the gathered layers and the views. Views the pool keeps are evaluated already,
        # and evaluating them again costs next to nothing (H200: 24 arrays, 0.004 ms).
        mx.eval([(c.keys, c.values) for c in caches])
    return caches


def _gathered_layers(pool: BlockPool, group: _GatherGroup, apart: bool) -> List[Tuple[mx.array, mx.array]]:
    """A gathered group's keys and values per layer, their kernel queued (``mx.async_eval``): each in a buffer
    of its own if ``apart``, else views of one gather (one op for the group, cheaper when nothing will update
    them in place). The views are cut after the gather is queued: evaluated together with its 96 views, a 32x48
    gather finished 0.07-0.10 ms later than alone on an H100, queued first 0.02-0.05 ms later: as if MLX launched
    the kernel only once it had gone through the views."""
    if apart:
        layers = pool.gather_apart(group.rows)
        mx.async_eval(layers)
        return layers
    keys, values = pool.gather(evaluate=False, rows=group.rows)
    mx.async_eval(keys, values)
    if group.hi - group.lo != keys.shape[2]:
        keys, values = keys[:, :, group.lo : group.hi, :], values[:, :, group.lo : group.hi, :]
    return list(zip(_split_layers(keys), _split_layers(values)))


def _split_layers(stacked: mx.array) -> List[mx.array]:
    """``[layers, ...]`` -> per-layer ``[1, ...]`` views, in one op."""
    return mx.split(stacked, stacked.shape[0], axis=0) if stacked.shape[0] > 1 else [stacked]


def _reuse_plan(spec: ModelCacheSpec, source_tokens: int, n_source_ids: int, reused_tokens: int, layer: int,
                n_tokens: int, quantized: bool) -> Tuple[int, int, int, int, Optional[Tuple[int, int, int]]]:
    """How ``layer`` of a context of ``n_tokens`` tokens, whose first ``reused_tokens`` came unchanged from a
    source context of ``source_tokens`` tokens holding ``n_source_ids`` blocks for the layer (0: no source),
    is stored: ``(first, new_from, last, source_offset, carried)``. Blocks ``[first, new_from)`` (those whose
    tokens all lie in the reused ones) are the source's, its layer list from ``source_offset`` on; blocks
    ``[new_from, last)`` are written. ``carried``, quantized pools only: ``(source offset, first slot, end
    slot)``, the slots of block ``new_from`` whose tokens came unchanged from the source, or ``None``.

    It depends on the layer only through its window, so a store computes it once per window and source
    list length, not once per layer."""
    first, last = spec.layer_block_range(layer, n_tokens)
    if n_source_ids == 0 or reused_tokens == 0:
        return first, first, last, 0, None
    size = spec.block_size
    src_first, _ = spec.layer_block_range(layer, source_tokens)
    src_start = spec.visible_range(layer, source_tokens)[0]
    start, end = spec.visible_range(layer, n_tokens)
    shared = set()
    for index in range(src_first, src_first + n_source_ids):
        lo, hi = max(start, index * size), min(end, (index + 1) * size)
        if lo < hi and src_start <= lo and hi <= reused_tokens:
            shared.add(index)
    # Only a prefix is shared: a context shorter than its source can start its window before the source's, so
    # its first block is written, and the reusable ones after it too.
    new_from = first
    while new_from in shared:
        new_from += 1
    carried = None
    if quantized:
        lo = max(start, new_from * size)
        hi = min(n_tokens, reused_tokens, (new_from + 1) * size)
        if src_start <= lo < hi and 0 <= new_from - src_first < n_source_ids:
            carried = (new_from - src_first, lo - new_from * size, hi - new_from * size)
    return first, new_from, last, first - src_first, carried


def _tokens(pool: BlockPool, token_ids, source: Optional[AgentBlocks], reused_tokens) -> Tuple[Sequence, tuple]:
    """``(tokens, prefix)``: ``token_ids`` as given (a NumPy array as a list), and the source's own tuple of its
    first ``reused_tokens``, which the store's blocks share as holding them: the caller's must equal them (then
    they need no other check: the source's are checked). :func:`_checked_tokens` checks the rest."""
    reused_tokens = checked_int("reused_tokens", reused_tokens, 0)
    if isinstance(token_ids, np.ndarray) and token_ids.ndim != 1:
        raise InvalidRequestError(f"token_ids must be one list of ints, got an array of shape {token_ids.shape}")
    length(token_ids, "token_ids")
    # A tuple is made only after the launch (_checked_tokens): copying 4,096 ids costs ~10 us.
    tokens = token_ids.tolist() if isinstance(token_ids, np.ndarray) else token_ids
    if source is None:
        if reused_tokens:
            raise InvalidRequestError("reused_tokens > 0 needs source= (the handle they came from)")
        return tokens, ()
    pool.check_handle(source)
    if reused_tokens > min(source.num_tokens, len(tokens)):
        raise InvalidRequestError(
            f"reused_tokens={reused_tokens}, but the source holds {source.num_tokens} tokens and the context "
            f"{len(tokens)}")
    prefix = source.token_ids[:reused_tokens]
    if prefix != tuple(tokens[:reused_tokens]):
        raise IncompatibleCacheError(
            f"the first {reused_tokens} tokens differ from the source's: only tokens it holds can be reused")
    return tokens, prefix


def _checked_tokens(tokens: Sequence, prefix: tuple) -> Tuple[int, ...]:
    """``tokens`` as a tuple of plain ints >= 0 (NumPy integers converted; bools, floats, negatives refused), its
    ``prefix`` as given. A store checks them after queueing its copy, while the device works: for 4,096 new
    tokens these passes take ~0.1 ms of Python (CPU), as long as a GPU store's whole copy."""
    tail = tuple(tokens[len(prefix):] if prefix else tokens)
    if not plain_ints(tail):
        tail = tuple(int_items(tail, "token_ids"))
    if not all_non_negative(tail):
        raise InvalidRequestError("token_ids must be non-negative")
    return prefix + tail if prefix else tail


def _check_layers_hold(spec: ModelCacheSpec, reads: List[tuple], n_tokens: int) -> None:
    """``IncompatibleCacheError`` unless every layer's cache (``read_layer_cache``'s ``(keys, values,
    first_token, offset)``) holds ``n_tokens`` tokens and keeps at least the tokens its layer keeps in this pool.
    Checked for all layers at once, then layer by layer only to name the first that fails."""
    if {read[3] for read in reads} <= {n_tokens} and not any(read[2] for read in reads):
        return  # each holds the whole context, from token 0: at or before the first token any layer keeps
    for layer, (_, _, first_token, offset) in enumerate(reads):
        if offset != n_tokens:
            raise IncompatibleCacheError(f"layer {layer} holds {offset} tokens, expected {n_tokens}")
        kept_from, _ = spec.visible_range(layer, n_tokens)
        if first_token > kept_from:  # e.g. a sliding window's cache for a full-attention layer
            window = spec.layer_windows[layer]
            raise IncompatibleCacheError(
                f"layer {layer} holds tokens {first_token}..{offset - 1} of {n_tokens}, but keeps tokens "
                f"{kept_from}.. in this pool ({'full attention' if window is None else f'window {window}'}); "
                "store caches of this pool's model")


def cache_to_blocks(
    pool: BlockPool,
    agent_id: str,
    caches: Sequence[adapter.LayerCache],
    token_ids: Sequence[int],
    *,
    source: Optional[AgentBlocks] = None,
    reused_tokens: int = 0,
    reservation: Optional[Reservation] = None,
) -> AgentBlocks:
    """Store ``caches`` (holding ``token_ids``) as a new handle, evaluated and independent of ``caches``.

    Blocks whose tokens all lie in the first ``reused_tokens`` tokens, which came
    unchanged from ``source``, are shared with ``source`` instead of written again.
    In a quantized pool, the reused tokens of the first new block are copied packed
    from ``source`` (quantizing their dequantized values again would change them).
    """
    _check_pool(pool)
    spec = pool.spec
    if not isinstance(caches, (list, tuple)) or not isinstance(token_ids, (list, tuple, range, np.ndarray)):
        raise InvalidRequestError(f"caches must be a list of layer caches and token_ids a list of ints, got "
                                  f"{type(caches).__name__} and {type(token_ids).__name__}")
    if len(caches) != spec.n_layers:
        raise IncompatibleCacheError(f"{len(caches)} layer caches for a {spec.n_layers}-layer pool")
    tokens, prefix = _tokens(pool, token_ids, source, reused_tokens)
    n_tokens = len(tokens)
    quantized = spec.block_format.quantized
    reuse = source is not None and reused_tokens != 0
    source_tokens = source.num_tokens if reuse else 0
    reads = [adapter.read_layer_cache(cache, whole_buffer=True) for cache in caches]
    _check_layers_hold(spec, reads, n_tokens)
    # Per layer: its blocks' plan (_reuse_plan), the same for every layer of a window and source list length.
    plans: Dict[Tuple[Optional[int], int], tuple] = {}
    layer_plans = []
    source_ids = [source.layer_block_ids(layer) for layer in range(spec.n_layers)] if reuse else None
    for layer, window in enumerate(spec.layer_windows):
        n_source_ids = len(source_ids[layer]) if reuse else 0
        plan = plans.get((window, n_source_ids))
        if plan is None:
            plan = plans[window, n_source_ids] = _reuse_plan(
                spec, source_tokens, n_source_ids, reused_tokens, layer, n_tokens, quantized)
        layer_plans.append(plan)
    with pool.build_handle(agent_id, reservation) as builder:
        if reuse:
            # Per layer, the source's blocks it shares: (first, new_from) of its plan, from source_offset on.
            shared = [ids[plan[3] : plan[3] + plan[1] - plan[0]] for ids, plan in zip(source_ids, layer_plans)]
            builder.retain(list(itertools.chain.from_iterable(shared)), of=source)  # released since: refused
        # One allocation for every layer: consecutive ids, so each layer's new blocks are one slice.
        new_ids = builder.allocate(sum(plan[2] - plan[1] for plan in layer_plans))
        layer_ids: List[List[int]] = []
        writes, copies = [], []
        taken = 0
        for layer, ((keys, values, first_token, offset), (_, new_from, last, _, carried)) in enumerate(
                zip(reads, layer_plans)):
            ids = new_ids[taken : taken + last - new_from]
            taken += last - new_from
            layer_ids.append([*shared[layer], *ids] if reuse else ids)
            if ids:  # the whole buffer, unsliced: the writes read only the new blocks' tokens of it, and a
                # slice would be strided (an extra operation, and a copy before a kernel needing contiguous input).
                # It may hold more than the layer's tokens (a buffer's unused tail): the write says how many.
                writes.append((ids, new_from, keys, values, first_token, offset - first_token))
                if carried is not None:
                    copies.append((ids[0], source_ids[layer][carried[0]], carried[1], carried[2]))
        builder._write_store(writes)  # numbers from the pool's own arithmetic: see _write_store
        token_ids = _checked_tokens(tokens, prefix)  # while the device copies (a rollback waits for it)
        if copies:
            pool.copy_token_rows(copies, of=source)
        return builder._finish_store(token_ids, layer_ids)
