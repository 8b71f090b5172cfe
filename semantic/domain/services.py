"""The block pool: a fixed number of 256-token KV blocks, reference-counted and attributed to agents.

Layout. All blocks live in two preallocated arrays, keys ``[total_blocks,
n_kv_heads, block_size, k_head_dim]`` and values likewise. Rebuilding a cache is
then one gather per group of layers that keep the same number of blocks, and
the gather writes straight into ``[layers, heads, tokens, head_dim]`` order, so
every byte is copied once and the number of kernels does not grow with
blocks x layers (per-block arrays concatenated per layer would). A layer that
needs a single block needs no gather at all: the block is already the
contiguous ``[heads, block_size, dim]`` a cache holds (:meth:`BlockPool.block_views`).

Invariants (checked by :meth:`BlockPool.check_invariants`):

* ``free + used == total_blocks``; a block is *used* iff its reference count is >= 1.
* A block's reference count equals the number of references held on it: one per
  live :class:`AgentBlocks` handle that lists it, plus one per raw
  :meth:`allocate` / :meth:`retain` (of the pool, or of a handle builder not yet
  finished) not yet given back.
* ``reserved <= free``: a reservation promises free blocks to a request that will
  need them later; only that reservation may take them.
* A block with reference count >= 1 is never written again (blocks are immutable
  once shared), so any handle may keep reading it.

Memory: the pool allocates ``total_blocks`` blocks up front (``BlockPool.nbytes``)
and, unless ``grow_buffer_cache=False``, raises MLX's buffer-cache limit to four
times that size (at least 1 GiB) so rebuilds reuse freed buffers instead of
page-faulting fresh memory.

Thread safety: every public method takes the pool's lock. Handles, pins and
unfinished builders dropped without ``release()`` are watched by weak references
whose callback only queues them (:class:`_Watch`); the queue is drained, under the
lock, at the start of the next pool operation. Reservations dropped uncancelled
stop promising their blocks the same way.

Interrupts (Ctrl-C, ``KeyboardInterrupt``) may come between any two steps of an
operation. Who holds what (``_owned``, ``_loose_refs``, the live reservations)
changes in single dictionary operations; the counts derived from it (reference
counts, free runs, reserved blocks) are marked unsettled while they follow, and
an operation that finds them unsettled recounts them from the holders first
(``_recount``). So an interrupted operation leaves the counts agreeing with the
holders, and what it made but did not return (a handle, a pin, a builder, a
reservation) gives its blocks back once collected; raw references taken by
``allocate`` / ``retain`` stay the agent's until ``release_blocks``
(``tests/test_pool_interrupts.py`` interrupts each operation at every point
where Python can).
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from semantic.adapters.mlx_kernels import (MAX_DESCRIBED_LAYOUTS, allocatable_bytes, compile_store_kernels,
                                           gather_row_pairs, gather_row_pairs_apart, host_view, host_views,
                                           pack_blocks, packs_blocks, split_host_copies, word_view,
                                           write_blocks_in_place, write_described_blocks_in_place,
                                           writes_through_host)
from semantic.domain.entities import AgentBlocks, KVBlock
from semantic.domain.errors import (
    BlockOwnershipError,
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
)
from semantic.domain.free_runs import FreeRuns, id_runs
from semantic.domain.request_checks import (all_non_negative, checked_int, checked_real, int_items, is_int,
                                            of_this_thread, plain_ints, shown)
from semantic.domain.quantized_blocks import QuantizedArenas, RowCopy, StoredWrite
from semantic.domain.value_objects import MAX_ARRAY_DIM, ModelCacheSpec

__all__ = ["BlockPool", "PoolUsage", "Reservation", "AgentBlocks", "KVBlock", "GatherRows"]

_pool_ids = itertools.count(1)


@dataclass(frozen=True)
class PoolUsage:
    """A snapshot of the pool. ``per_agent`` maps agent id -> (distinct blocks, bytes) it refers to;
    a block shared by two agents appears under both, and once in ``used_blocks``."""

    total_blocks: int
    free_blocks: int
    used_blocks: int
    reserved_blocks: int
    block_bytes: int
    per_agent: Dict[str, Tuple[int, int]] = field(default_factory=dict)

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    @property
    def free_bytes(self) -> int:
        return self.free_blocks * self.block_bytes


class Reservation:
    """Free blocks promised to one request; allocations drawn from it cannot fail. Made by
    :meth:`BlockPool.reserve` only: the pool refuses any other (one made by hand would promise blocks the
    pool never set aside)."""

    def __init__(self, pool: "BlockPool", blocks: int, owner: str):
        self._pool = pool
        self.owner = owner
        self._remaining = blocks
        self.cancelled = False
        self._watch_key: Optional[int] = None  # of its watch in the pool (a reservation dropped uncancelled)

    @property
    def remaining(self) -> int:
        """Blocks still promised (the pool's count: read-only)."""
        return self._remaining

    def cancel(self) -> None:
        """Give back what was not used. Idempotent."""
        self._pool._cancel_reservation(self)


class _BuilderIds(list):
    """A builder's list of ids in the pool's ``_owned``: its blocks, unlike a handle's or a pin's, are written. A
    type, not a registry of builders: nothing to keep in step (a weak set's callback, run as a builder dies, is
    Python code where an interrupt is lost)."""


class _HandleBuilder:
    """Collects the references a new handle will own; rolls them back if building fails. Until
    :meth:`finish` gives them to the handle they are the builder's, attributed to its agent but not raw
    references of the agent: ``release_blocks`` cannot give them back from under the builder."""

    def __init__(self, pool: "BlockPool", agent_id: str, reservation: Optional[Reservation]):
        self._pool = pool
        self._agent_id = agent_id
        self._reservation = reservation
        self._from_reservation = 0  # blocks allocated out of it: a rollback promises them to it again
        self._held: List[int] = _BuilderIds()  # in the pool's _owned table from its first id on
        self._allocated: List[int] = []  # the ids of allocate(), in order (a subset of _held)
        self._one_run = False  # whether _allocated came from one allocation, as one run of consecutive ids
        self._pending: Optional[mx.array] = None  # write_new's kernel, queued: waited for before the blocks go
        self._watch: Optional[_Watch] = None  # gives _held back if the builder is dropped unfinished

    def allocate(self, n: int) -> List[int]:
        n = checked_int("n_blocks", n, 0)
        pool = self._pool
        with pool._lock:
            pool._drain()
            reservation = self._reservation
            promised = reservation._remaining if reservation is not None else 0
            try:
                ids, one_run = pool._take(n, reservation)
                self._hold(ids)
                pool._settled = True
            finally:  # also if interrupted: a rollback promises the reservation again what it gave
                if reservation is not None:
                    self._from_reservation += promised - reservation._remaining
                    if self._watch is not None:  # as does the builder's end when it is dropped unfinished
                        self._watch.from_reservation = self._from_reservation
            self._one_run = one_run and not self._allocated
            self._allocated.extend(ids)
        return ids

    def write_new(self, writes: List[tuple]) -> None:
        """:meth:`BlockPool.write_many` for the blocks this builder allocated, every one of them, in the order
        allocated (``writes``' ids one after another). Held by this builder alone since, they need none of the
        pool's checks of ids and ownership (~40 us of a 16 x 30 store); the writes themselves are checked.

        Where the device writes them (CUDA), the kernel is only queued: the caller's Python goes on while it
        copies, and :meth:`finish`, or a rollback, waits for it before the blocks leave the builder."""
        # Ids as ints: floats equal to the allocation's passed its comparison, then failed the write (TypeError).
        self._write_allocated([(int_items(list(write[0]), "block_ids"), *write[1:])
                               for write in map(self._pool._checked_write, writes)])

    def _write_store(self, writes: List[tuple]) -> None:
        """:meth:`write_new` for ``cache_to_blocks`` alone: ``(ids, first_index, keys, values, first_token,
        n_tokens)``, the numbers from the pool's own block arithmetic (so not public: a caller's numbers need
        :meth:`write_new`'s checks). Only what its caller brought, the arrays, is checked, once per distinct
        shape (:meth:`BlockPool._check_store_sources`): each write's own checks were a third of a store's Python
        before its kernel launch (4 x 24 on CPU, the CUDA path's Python: 66 -> 47 us)."""
        self._pool._check_store_sources(writes)
        self._write_allocated(writes)

    def _write_allocated(self, writes: List[tuple]) -> None:
        pool = self._pool
        ids = list(itertools.chain.from_iterable(write[0] for write in writes))
        if ids != self._allocated:
            raise BlockOwnershipError("a builder writes every block it allocated, in order, and no other")
        if not ids:
            return
        with pool._lock:
            # The watch keeps it too: a builder dropped unfinished gives its blocks back once the kernel is done.
            self._pending = self._watch.pending = of_this_thread(
                lambda: pool._write_checked(writes, ids, one_run=self._one_run), "keys or values")

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:  # on CUDA the write's sources are first evaluated here
            of_this_thread(lambda: mx.eval(pending), "keys or values")

    def retain(self, block_ids: Sequence[int], of: Optional[AgentBlocks] = None) -> None:
        """References on blocks in use. ``of``: the live handle they were read from, checked again under the
        pool's lock: released meanwhile, its blocks may be free or another agent's by now."""
        pool = self._pool
        block_ids = pool._checked_ids(block_ids)
        with pool._lock:
            pool._drain()
            if of is not None:
                pool.check_handle(of)
            pool._ref_used(block_ids)
            self._hold(block_ids)
            pool._settled = True

    def _hold(self, block_ids: List[int]) -> None:
        if block_ids and not self._held:
            self._watch = self._pool._watch(self, self._held, self._agent_id)  # watched before it holds anything
            self._watch.reservation = self._reservation
            self._pool._owned[self._agent_id][id(self._held)] = self._held
        self._held.extend(block_ids)

    def finish(self, token_ids: Sequence[int], layer_block_ids: Sequence[Sequence[int]]) -> AgentBlocks:
        tokens = _int_list("token_ids", token_ids)
        if not all_non_negative(tokens):
            raise InvalidRequestError("token_ids must be non-negative")
        layers = _sequence("layer_block_ids", layer_block_ids)
        if len(layers) != self._pool.spec.n_layers:
            raise InvalidRequestError(f"layer_block_ids needs one list per layer ({self._pool.spec.n_layers}), got {len(layers)}")
        layers = _int_tuples("layer_block_ids", layers)
        listed = sorted(itertools.chain.from_iterable(layers))
        # Equal to the references taken, which are checked ids of this pool, so these are too.
        if listed != sorted(self._held):
            raise BlockOwnershipError(
                "a handle must own exactly the references taken for it (allocate / retain on this builder)"
            )
        # A block holds one layer's tokens of one stretch: listed twice, a handle would rebuild a context
        # larger than the pool (MLX crashes, rather than raising, when it cannot get the memory).
        repeated = next((a for a, b in zip(listed, listed[1:]) if a == b), None)
        if repeated is not None:
            raise BlockOwnershipError(f"block {repeated} is listed {listed.count(repeated)} times; a handle lists "
                                      "each of its blocks once (one layer's tokens of one stretch)")
        return self._adopt(tuple(tokens), tuple(layers))

    def _finish_store(self, token_ids: Tuple[int, ...], layer_block_ids: List[List[int]]) -> AgentBlocks:
        """:meth:`finish` for ``cache_to_blocks`` alone, which built ``layer_block_ids`` from exactly the ids it
        retained and allocated here, each once, and checked ``token_ids`` itself (a tuple of plain ints >= 0) at
        its door: :meth:`finish`'s checks of the same cost a 16 x 30 store ~0.1 ms. Not public: ids a caller
        lists need those checks (listed twice, or another agent's, they gave negative reference counts and
        freed blocks still in use)."""
        if len(layer_block_ids) != self._pool.spec.n_layers or sum(map(len, layer_block_ids)) != len(self._held):
            raise BlockOwnershipError("a handle must own exactly the references taken for it")
        return self._adopt(token_ids, tuple(map(tuple, layer_block_ids)))

    def _adopt(self, token_ids: Tuple[int, ...], layer_block_ids: Tuple[Tuple[int, ...], ...]) -> AgentBlocks:
        self._wait()
        handle = self._pool._adopt(self._agent_id, token_ids, layer_block_ids, self._held)
        self._pool._unwatch(self._held)
        self._held = _BuilderIds()
        self._allocated = []
        self._from_reservation = 0
        self._one_run = False
        return handle

    def __enter__(self) -> "_HandleBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        unwritten = None
        try:
            self._wait()  # blocks given back while the device still writes them could be another's by then
        except InvalidRequestError as error:  # the write never ran (sources of another thread): nothing writes
            unwritten = error
        if self._held:
            pool = self._pool
            with pool._lock:
                pool._drain()
                pool._settled = False
                pool._drop(self._held, self._agent_id)
                if self._from_reservation:  # the blocks just freed: a failed build uses none of a reservation
                    pool._promise_again(self._reservation, self._from_reservation)
                pool._settled = True
                pool._unwatch(self._held)
            self._held = _BuilderIds()
            self._from_reservation = 0
        if unwritten is not None and exc is None:  # else the error that ended the build is the one to see
            raise unwritten


class BlockPin:
    """References on a handle's blocks without a handle (:meth:`BlockPool.pin`), given back when the pin is
    garbage-collected. Copies are the pin itself: a copied cache object still views the same memory
    (``copy.deepcopy`` of an ``mx.array`` shares its buffer)."""

    __slots__ = ("__weakref__",)

    def __copy__(self) -> "BlockPin":
        return self

    def __deepcopy__(self, memo) -> "BlockPin":
        return self


class _Watch(weakref.ref):
    """A weak reference to what holds references on blocks outside the pool (a handle, a pin, an unfinished
    builder), with what to give back once it is collected: its list in ``_owned`` (``held``), its agent, and
    a write kernel to wait for first (``pending``, a builder's), and the reservation a builder allocated
    ``from_reservation`` blocks from, which promises them again. Its callback is the pool's queue's ``append``,
    a C function: the holder's death queues the watch without running Python code, so no interrupt (Ctrl-C)
    can come in between and lose the blocks, as one could at the start of a ``__del__`` or a
    ``weakref.finalize`` callback. :meth:`BlockPool._drain` gives them back at the next pool operation."""

    __slots__ = ("held", "agent_id", "pending", "reservation", "from_reservation")


class BlockPool:
    """A fixed number of KV blocks of one model geometry. See the module docstring for the invariants."""

    def __init__(self, spec: ModelCacheSpec, total_blocks: int, *, grow_buffer_cache: bool = True):
        if not isinstance(spec, ModelCacheSpec):
            raise InvalidRequestError(f"spec must be a ModelCacheSpec, got {type(spec).__name__}")
        total_blocks = checked_int("total_blocks", total_blocks, 1)
        needed, limit = total_blocks * spec.bytes_per_block_per_layer, mx.get_memory_limit()
        if needed > limit:  # MLX crashes, rather than raising, when it cannot get the memory
            raise InvalidRequestError(
                f"{total_blocks} blocks of {spec.describe()} take {needed / 2**30:.1f} GiB, more than MLX may "
                f"allocate here ({limit / 2**30:.1f} GiB, mx.get_memory_limit()); use at most "
                f"{limit // spec.bytes_per_block_per_layer} blocks, or a quantized block format")
        if total_blocks * spec.n_kv_heads >= MAX_ARRAY_DIM:  # the gathers view the arrays as rows of one head
            raise InvalidRequestError(f"{total_blocks} blocks of {spec.n_kv_heads} KV heads make more than 2**31 "
                                      f"rows, over MLX's 32-bit array dimensions; use at most "
                                      f"{(MAX_ARRAY_DIM - 1) // spec.n_kv_heads} blocks")
        self.spec = spec
        self.total_blocks = total_blocks
        self.pool_id = next(_pool_ids)
        self._lock = threading.RLock()
        self._blocks_back = threading.Condition(self._lock)  # blocks freed or a reservation given back
        self._free = FreeRuns(total_blocks)
        self._refcount = [0] * total_blocks
        # What this pool handed out, by identity: only these are taken back (see GatherRows, Reservation).
        self._issued_rows: "weakref.WeakSet[GatherRows]" = weakref.WeakSet()
        self._issued_reservations: "weakref.WeakSet[Reservation]" = weakref.WeakSet()
        # Who holds the references, per agent: the raw ones of allocate / retain not given back (release_blocks
        # may give back only these) ...
        self._loose_refs: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        # ... and the ids each live handle and each builder in progress holds, keyed by the list's id(): a
        # handle's references change hands in one dict operation, not one per block (~1,000 in a long context).
        self._owned: Dict[str, Dict[int, List[int]]] = collections.defaultdict(dict)
        self._reserved = 0
        # False while the counts derived from who holds what (reference counts, free runs, reserved blocks) are
        # being changed to follow a change of the holders: an interrupt (Ctrl-C) there leaves it False, and
        # the next pool operation recounts them (_drain, _recount) before it reads them.
        self._settled = True
        self._released_by_gc: collections.deque = collections.deque()  # _Watch objects of collected holders
        # Every holder's watch, by id() of its list in _owned: kept alive here, so that its callback runs. Made
        # before the holder's references are attributed to it, and dropped only after they are given back.
        self._watches: Dict[int, _Watch] = {}
        self._handles: "weakref.WeakSet[AgentBlocks]" = weakref.WeakSet()

        # Quantized blocks live in their own arrays; every storage method dispatches once on this.
        self._quantized = QuantizedArenas(spec, total_blocks) if spec.block_format.quantized else None
        self._dtype = getattr(mx, spec.dtype)  # of the caches stored, whatever the block format
        self._block_bytes = spec.bytes_per_block_per_layer  # computed from the format's parts: ~2 us a call
        shape = (0 if self._quantized else total_blocks, spec.n_kv_heads, spec.block_size)
        self._keys = mx.zeros(shape + (spec.k_head_dim,), dtype=self._dtype)
        self._values = mx.zeros(shape + (spec.v_head_dim,), dtype=self._dtype)
        mx.eval(self._keys, self._values)
        self._host_views: Optional[Tuple[np.ndarray, np.ndarray]] = None
        # While the pool writes its arrays in place (see writes_in_place), each block's evaluated whole-block
        # views, made once: the arrays' buffers never change then, and a view held by the pool costs nothing.
        # Other writes replace the arrays, so they drop these (a held view would also stop MLX from updating
        # the arrays in place: it would copy them whole at every store).
        self._whole_views: Dict[int, Tuple[mx.array, mx.array]] = {}
        if grow_buffer_cache:
            _ensure_buffer_cache(max(4 * self.nbytes, 1 << 30))  # room for rebuilds alive at once and temporaries

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return self._block_bytes

    @property
    def writes_in_place(self) -> bool:
        """Whether stores write into the pool's arrays themselves, so that views of them (a rebuild of one
        block per layer, see ``blocks_to_cache``) stay valid and cost nothing: on CPU through NumPy views of
        them, on CUDA by one kernel for a dense pool. Elsewhere a store replaces the arrays (MLX slice
        updates), and a live view of the old ones makes it copy them whole."""
        return self._quantized is None and (writes_through_host() or packs_blocks(self._keys, self._values))

    def compile_kernels(self) -> bool:
        """Compile now, not at the first store, the kernel that stores of every layer launch (CUDA only: MLX
        compiles a custom kernel at its first launch in each process, 1.4-2.3 s on an H100). Writes no block
        of the pool. Returns whether there was one to compile. The rebuild's kernels need no such call: they
        compile in ~0.05 s (:mod:`semantic.adapters.nvrtc`)."""
        spec = self.spec
        return compile_store_kernels(self._dtype, spec.n_kv_heads, spec.k_head_dim, spec.v_head_dim, spec.block_size,
                                     spec.n_layers, into_pool=self._quantized is None)

    @property
    def nbytes(self) -> int:
        """Bytes the pool's storage holds (all blocks, used or not)."""
        if self._quantized is not None:
            return self._quantized.nbytes
        return self._keys.nbytes + self._values.nbytes

    @property
    def free_blocks(self) -> int:
        with self._lock:
            self._drain()
            return len(self._free)

    @property
    def available_blocks(self) -> int:
        """Free blocks not promised to a reservation."""
        with self._lock:
            self._drain()
            return len(self._free) - self._reserved

    @property
    def reserved_blocks(self) -> int:
        """Free blocks promised to reservations (requests in flight), not yet allocated."""
        with self._lock:
            self._drain()
            return self._reserved

    def wait_for_blocks(self, n_blocks: int, timeout: float, stop: Callable[[], object] = lambda: False) -> bool:
        """Wait, at most ``timeout`` seconds and until ``stop()`` is true, for ``n_blocks`` available blocks
        (free, not promised to a reservation): for an engine whose requests wait on another engine's, which
        give back blocks and reservations as they end. Returns whether the blocks are available. Woken as
        blocks are freed or a reservation given back, and every 50 ms (``stop`` is polled, and a handle
        dropped to the garbage collector queues its blocks without waking anyone)."""
        n_blocks = checked_int("n_blocks", n_blocks, 0)
        timeout = checked_real("timeout", timeout, 0)  # a NaN deadline is never reached: the wait would hang
        if not callable(stop):
            raise InvalidRequestError(f"stop must be a callable, got {type(stop).__name__}")
        deadline = time.monotonic() + timeout
        with self._blocks_back:
            while True:
                self._drain()
                if len(self._free) - self._reserved >= n_blocks:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or stop():
                    return False
                self._blocks_back.wait(min(left, 0.05))

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    def refcount(self, block_id: int) -> int:
        with self._lock:
            self._drain()
            return self._refcount[self._checked_id(block_id)]

    def usage(self) -> PoolUsage:
        with self._lock:
            self._drain()
            per_agent = {}
            for agent in dict.fromkeys(itertools.chain(self._loose_refs, self._owned)):
                blocks = set(self._loose_refs.get(agent, ()))
                for ids in self._owned.get(agent, {}).values():
                    blocks.update(ids)
                if blocks:
                    per_agent[agent] = (len(blocks), len(blocks) * self.block_bytes)
            return PoolUsage(
                self.total_blocks, len(self._free), self.total_blocks - len(self._free), self._reserved,
                self.block_bytes, per_agent,
            )

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (used by the tests)."""
        with self._lock:
            self._drain()
            self._free.check()
            free = set(self._free)
            used = {b for b, c in enumerate(self._refcount) if c > 0}
            assert free.isdisjoint(used), "a referenced block is on the free list"
            assert len(free) + len(used) == self.total_blocks, "free + used != total"
            assert all(c >= 0 for c in self._refcount), "negative reference count"
            assert 0 <= self._reserved <= len(self._free), "reservations exceed free blocks"
            assert self._reserved == self._promised(), "reserved blocks != what the live reservations promise"
            assert self._references_held() == self._refcount, "refcounts != references held"
            from_handles = collections.Counter()
            for handle in list(self._handles):
                if not handle.released:
                    from_handles.update(b for ids in handle.all_block_ids for b in ids)
                    assert self._owned.get(handle.agent_id, {}).get(id(handle._flat_ids)) is handle._flat_ids, \
                        "a live handle's references are not attributed to its agent"
            assert all(id(ids) in self._watches for owned in self._owned.values() for ids in owned.values()), \
                "a holder's references would not go back when it is collected"
            for block, count in from_handles.items():
                assert self._refcount[block] >= count, f"block {block}: fewer references than handles listing it"

    # ---- raw references -----------------------------------------------------------------------
    def allocate(self, n_blocks: int, agent_id: str, *, reservation: Optional[Reservation] = None) -> List[int]:
        """Take ``n_blocks`` free blocks (reference count 1, attributed to ``agent_id``). All or nothing. They
        are one run of consecutive ids whenever the free blocks hold one that long (the shortest such run:
        :class:`~semantic.domain.free_runs.FreeRuns`)."""
        n_blocks = checked_int("n_blocks", n_blocks, 0)
        _check_agent_id(agent_id)
        self._check_reservation(reservation)
        with self._lock:
            self._drain()
            ids = self._take(n_blocks, reservation)[0]
            self._loose_refs[agent_id].update(ids)
            self._settled = True
            return ids

    def _take(self, n_blocks: int, reservation: Optional[Reservation]) -> Tuple[List[int], bool]:
        """``n_blocks`` free blocks at reference count 1, and whether they are one run of consecutive ids; or
        ``PoolExhaustedError`` (the lock held). Leaves the counts unsettled: the caller attributes the ids to
        their holder, then sets ``_settled``."""
        if reservation is not None:
            from_reservation = min(n_blocks, reservation._remaining)
        else:
            from_reservation = 0
        available = len(self._free) - self._reserved
        if n_blocks - from_reservation > available:
            raise PoolExhaustedError(n_blocks, available + from_reservation)
        self._settled = False
        if from_reservation:
            reservation._remaining -= from_reservation
            self._reserved -= from_reservation
        taken = self._free.take(n_blocks)
        one_run = type(taken) is range
        if one_run:  # one slice assignment: a loop over 480 ids took 12 us (CPU)
            self._refcount[taken.start : taken.stop] = [1] * n_blocks
        else:
            for b in taken:
                self._refcount[b] = 1
        return list(taken), one_run

    def retain(self, block_ids: Sequence[int], agent_id: str) -> None:
        """One more reference on each of ``block_ids`` (which must be in use), attributed to ``agent_id``."""
        block_ids = self._checked_ids(block_ids)
        _check_agent_id(agent_id)
        with self._lock:
            self._drain()
            self._ref_used(block_ids)
            self._loose_refs[agent_id].update(block_ids)
            self._settled = True

    def _ref_used(self, block_ids: List[int]) -> None:
        """One more reference on each of ``block_ids`` (checked ids), all in use, or none (the lock held). Leaves
        the counts unsettled, as :meth:`_take` does."""
        refcount = self._refcount
        if 0 in map(refcount.__getitem__, block_ids):
            free = next(b for b in block_ids if refcount[b] == 0)
            raise BlockOwnershipError(f"block {free} is free; only blocks in use can be shared")
        self._settled = False
        for b in block_ids:
            refcount[b] += 1

    def release_blocks(self, block_ids: Sequence[int], agent_id: str) -> None:
        """Give back one reference per id taken by :meth:`allocate` / :meth:`retain` (a handle's
        references go back with the handle). Checks everything first: a bad call changes nothing."""
        block_ids = self._checked_ids(block_ids)
        _check_agent_id(agent_id)
        with self._lock:
            self._drain()
            wanted = collections.Counter(block_ids)
            held = self._loose_refs.get(agent_id, {})
            for b, n in wanted.items():
                if held.get(b, 0) < n:
                    raise BlockOwnershipError(
                        f"agent {agent_id!r} does not hold {n} reference(s) on block {b} outside a handle; "
                        "blocks are released once, by the agent that holds them (a handle's with the handle)"
                    )
            self._settled = False
            _subtract(self._loose_refs, agent_id, wanted)
            self._unref(block_ids)
            self._settled = True

    def reserve(self, n_blocks: int, owner: str) -> Reservation:
        """Promise ``n_blocks`` free blocks to ``owner``; raises ``PoolExhaustedError`` if they are not there."""
        n_blocks = checked_int("n_blocks", n_blocks, 0)
        if not isinstance(owner, str):
            raise InvalidRequestError(f"owner must be a string (who the blocks are for), got {owner!r}")
        with self._lock:
            self._drain()
            available = len(self._free) - self._reserved
            if n_blocks > available:
                raise PoolExhaustedError(n_blocks, available, f"(reserving for {owner})")
            reservation = Reservation(self, n_blocks, owner)  # first: an interrupt in its __init__ reserves nothing
            reservation._watch_key = id(self._watch(reservation, None, owner))  # its promise ends when it is collected
            self._settled = False
            self._reserved += n_blocks
            self._issued_reservations.add(reservation)
            self._settled = True
            return reservation

    def _check_reservation(self, reservation) -> None:
        if reservation is None:
            return
        if not isinstance(reservation, Reservation):
            raise InvalidRequestError(f"reservation must be a Reservation from reserve(), got {type(reservation).__name__}")
        if reservation._pool is not self:
            raise IncompatibleCacheError("that reservation belongs to another pool")
        if reservation not in self._issued_reservations:
            raise InvalidRequestError("that reservation was not made by this pool's reserve(): it promises blocks "
                                      "the pool never set aside; reserve them with pool.reserve(n, owner)")

    def _cancel_reservation(self, reservation: Reservation) -> None:
        with self._lock:
            self._drain()
            self._settled = False
            self._reserved -= reservation._remaining
            reservation._remaining = 0
            reservation.cancelled = True
            self._settled = True
            self._watches.pop(reservation._watch_key, None)
            self._blocks_back.notify_all()

    def _promise_again(self, reservation: Reservation, n_blocks: int) -> None:
        """Give ``n_blocks`` just freed back to the reservation they were allocated from (the lock held)."""
        if not reservation.cancelled:
            reservation._remaining += n_blocks
            self._reserved += n_blocks

    # ---- handles ------------------------------------------------------------------------------
    def build_handle(self, agent_id: str, reservation: Optional[Reservation] = None) -> _HandleBuilder:
        """``with pool.build_handle(agent) as b: ...; handle = b.finish(tokens, ids)`` (rolled back on error)."""
        _check_agent_id(agent_id)
        self._check_reservation(reservation)
        return _HandleBuilder(self, agent_id, reservation)

    def _adopt(self, agent_id: str, token_ids, layer_block_ids, held: List[int]) -> AgentBlocks:
        """A handle owning the references a builder took (``held``: exactly its ids, checked by the builder)."""
        if len(layer_block_ids) != self.spec.n_layers:
            raise AssertionError("one block list per layer")
        with self._lock:
            self._drain()
            handle = AgentBlocks(self, agent_id, token_ids, layer_block_ids, normalized=True)
            self._watch(handle, handle._flat_ids, agent_id)
            owned = self._owned[agent_id]
            # The references change hands: between the two, no holder has them (an interrupt there frees them,
            # and the unreturned handle's watch then finds nothing to give back).
            self._settled = False
            owned.pop(id(held), None)  # absent for a handle of no blocks
            owned[id(handle._flat_ids)] = handle._flat_ids
            self._settled = True
            self._handles.add(handle)
        return handle

    def share(self, handle: AgentBlocks, agent_id: Optional[str] = None) -> AgentBlocks:
        """A new handle on ``handle``'s blocks, for ``agent_id`` (default: the same agent)."""
        with self._lock:
            self._drain()
            self.check_handle(handle)  # under the lock: a release in between would leave the copies dangling
            agent = handle.agent_id if agent_id is None else agent_id
            _check_agent_id(agent)
            # The handle's own tuples: nothing to copy or check again (a context of 8K tokens on a
            # 30-layer model is ~1,000 blocks, and this runs on every resume).
            shared = AgentBlocks(self, agent, handle.token_ids, handle.all_block_ids, normalized=True)
            # Same blocks, same tokens: the same derived values (a rebuild's plan). The engine rebuilds
            # from a share made per request, which would otherwise plan every resume afresh.
            shared._memo = handle._memo
            shared.computed_by = handle.computed_by
            shared.vouched_for = handle.vouched_for
            self._watch(shared, shared._flat_ids, agent)
            refcount = self._refcount
            self._settled = False
            for b in shared._flat_ids:  # in use, as every block of a live handle is
                refcount[b] += 1
            self._owned[agent][id(shared._flat_ids)] = shared._flat_ids
            self._settled = True
            self._handles.add(shared)
            return shared

    def pin(self, handle: AgentBlocks) -> "BlockPin":
        """One more reference on each of ``handle``'s blocks, held by the returned pin until it is garbage-collected:
        what caches viewing the blocks keep (``blocks_to_cache``). A handle would do, but building and finalizing
        one cost a quarter of a 1x12 rebuild (CPU: 5.6 of 21 us)."""
        with self._lock:
            self._drain()
            self.check_handle(handle)  # under the lock: a release in between would leave the pin dangling
            ids = list(handle._flat_ids)
            pin = BlockPin()
            self._watch(pin, ids, handle.agent_id)
            refcount = self._refcount
            self._settled = False
            for b in ids:
                refcount[b] += 1
            self._owned[handle.agent_id][id(ids)] = ids
            self._settled = True
            return pin

    def release(self, handle: AgentBlocks) -> None:
        """Release a handle's references. A second release raises ``ReleasedHandleError``."""
        with self._lock:
            self._drain()
            self.check_handle(handle)  # under the lock: of two threads releasing one handle, one raises
            held = handle._flat_ids
            self._settled = False
            # Released before its references go: a handle that still looks live always holds them. Interrupted
            # in between, its watch gives them back when the handle is collected.
            handle._layer_block_ids = None
            self._drop(held, handle.agent_id)
            self._settled = True
            self._unwatch(held)
            handle._flat_ids = None
            handle._memo = {}  # not cleared: its shares may hold the same memo
            self._handles.discard(handle)

    def check_handle(self, handle: AgentBlocks) -> None:
        """Raise a typed error unless ``handle`` is a live handle of this pool."""
        if not isinstance(handle, AgentBlocks):
            raise InvalidRequestError(f"expected AgentBlocks, got {type(handle).__name__}")
        if handle.pool is not self:
            if handle.spec != self.spec:
                raise IncompatibleCacheError(
                    f"these blocks have another geometry ({handle.spec.describe()}) than this pool "
                    f"({self.spec.describe()}); they cannot be used with this model"
                )
            raise IncompatibleCacheError(
                f"these blocks belong to pool #{handle.pool.pool_id}, not to pool #{self.pool_id}; "
                "use them with the engine that made them"
            )
        if handle.released:
            handle.all_block_ids  # raises ReleasedHandleError with the agent's name
        if self._owned.get(handle.agent_id, {}).get(id(handle._flat_ids)) is not handle._flat_ids:
            raise InvalidRequestError(
                f"this AgentBlocks of agent {handle.agent_id!r} holds no references of pool #{self.pool_id}: it was "
                "made by hand; use the handles the pool, the engine or an AgentCacheStore return")

    def _promised(self) -> int:
        """Blocks the live reservations still promise: what ``_reserved`` counts."""
        return sum(r._remaining for r in list(self._issued_reservations) if not r.cancelled)

    def _watch(self, holder, held: Optional[List[int]], agent_id: str) -> "_Watch":
        """Watch ``holder``, which is to hold the references in ``held`` (the lock held): once it is collected,
        they go back at the next pool operation. ``held=None``: ``holder`` is a reservation, whose promise then
        ends. The watch is kept in ``_watches`` under ``id(held)``, a reservation's under its own id."""
        watch = _Watch(holder, self._released_by_gc.append)
        watch.held, watch.agent_id, watch.pending = held, agent_id, None
        watch.reservation, watch.from_reservation = None, 0
        self._watches[id(watch) if held is None else id(held)] = watch
        return watch

    def _unwatch(self, held: List[int]) -> None:
        """Stop watching the holder of ``held``, whose references were given back or passed on."""
        self._watches.pop(id(held), None)

    def _drain(self) -> None:
        """Recount after an interrupt, then give back the references of holders the garbage collector took (the
        lock held). Every operation calls it first, before it reads or changes the counts."""
        if not self._settled:
            self._recount()
        queue = self._released_by_gc
        while queue:
            watch = queue[0]  # taken off the queue only once given back: an interrupt loses nothing
            if watch.held is None:  # a reservation collected uncancelled: what it still promised is free again
                self._reserved = self._promised()
                self._watches.pop(id(watch), None)
            else:
                if watch.pending is not None:  # a builder's write kernel: done before its blocks are taken again
                    try:
                        of_this_thread(lambda: mx.eval(watch.pending), "a dropped builder's write")
                    except InvalidRequestError:  # never ran (its sources are another thread's): nothing writes
                        pass
                self._settled = False
                if self._drop(watch.held, watch.agent_id) and watch.from_reservation:
                    self._promise_again(watch.reservation, watch.from_reservation)
                self._settled = True
                self._unwatch(watch.held)
            queue.popleft()

    def _drop(self, held: List[int], agent_id: str) -> bool:
        """Give back the references of a handle or builder (``held``, its list in ``_owned``), unless given back
        already (an operation repeated after an interrupt, or a watch after one); whether it gave them back."""
        owned = self._owned.get(agent_id)
        if owned is None or owned.pop(id(held), None) is None:
            return False
        if not owned:
            del self._owned[agent_id]
        self._unref(held)
        return True

    def _references_held(self) -> List[int]:
        """Per block, the references held on it: the raw ones in ``_loose_refs`` and one per list in ``_owned``
        that names it (what its reference count must be)."""
        counts = [0] * self.total_blocks
        for refs in self._loose_refs.values():
            for block, n in refs.items():
                counts[block] += n
        for owned in self._owned.values():
            for ids in owned.values():
                for block in ids:
                    counts[block] += 1
        return counts

    def _recount(self) -> None:
        """Derive the reference counts, the free runs and the reserved count again from who holds what (the
        handles', builders' and pins' lists in ``_owned``, the raw references in ``_loose_refs``, the live
        reservations): an interrupt (Ctrl-C) stopped a change of them half way. Built aside, then put in place,
        so an interrupt here leaves the pool unsettled, to be recounted at its next operation."""
        counts = self._references_held()
        free = FreeRuns.of([block for block, n in enumerate(counts) if not n])
        reserved = self._promised()
        self._refcount[:] = counts
        self._free, self._reserved = free, reserved
        self._settled = True
        self._blocks_back.notify_all()

    def _unref(self, block_ids: List[int]) -> None:
        """One reference fewer per id (held, so counted >= 1); blocks left with none go back on the free list."""
        refcount = self._refcount
        freed = []
        for b in block_ids:
            left = refcount[b] - 1
            refcount[b] = left
            if not left:
                freed.append(b)
        self._free.give_back(freed)
        if freed:
            self._blocks_back.notify_all()

    def _checked_id(self, block_id) -> int:
        if not is_int(block_id) or not 0 <= block_id < self.total_blocks:
            raise BlockOwnershipError(f"block id {block_id!r} is not in this pool (0..{self.total_blocks - 1})")
        return int(block_id)

    def _checked_ids(self, block_ids) -> List[int]:
        """``block_ids`` as a list of ids of this pool. Sharing a long context retains ~1,000 ids per store,
        so plain ints are checked in one pass of C-level builtins rather than one Python call per id."""
        ids = _sequence("block_ids", block_ids)
        if not plain_ints(ids) or (ids and (min(ids) < 0 or max(ids) >= self.total_blocks)):
            ids = [self._checked_id(b) for b in ids]  # names the offending id
        return ids

    def _block_array(self, block_ids, ndim: int) -> np.ndarray:
        """Block ids as an int32 array, checked in bulk: an id outside the arrays would read or write out of
        bounds (the storage calls are on the hot path, so this is one NumPy pass, not a Python loop)."""
        try:
            ids = np.asarray(block_ids)
        except (ValueError, TypeError):
            ids = None
        if ids is None or ids.ndim != ndim or (ids.size and (
                ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.total_blocks)):
            raise BlockOwnershipError(
                f"block ids must be {'a list' if ndim == 1 else 'equal-length lists'} of ids in this pool "
                f"(0..{self.total_blocks - 1}), got {block_ids!r}"
            )
        return ids.astype(np.int32)

    # ---- storage ------------------------------------------------------------------------------
    def block_keys(self, block_id: int) -> mx.array:
        if self._quantized is not None:
            return self._quantized.block(self._checked_id(block_id))[0]
        return self._keys[self._checked_id(block_id)]

    def block_values(self, block_id: int) -> mx.array:
        if self._quantized is not None:
            return self._quantized.block(self._checked_id(block_id))[1]
        return self._values[self._checked_id(block_id)]

    def block_views(self, block_ids: Sequence[int], lo: int, hi: int) -> List[Tuple[mx.array, mx.array]]:
        """Per block, its keys and values of slots ``[lo, hi)`` as ``[1, heads, hi - lo, dim]`` slices of the
        pool's arrays: evaluated, they share the pool's memory (no copy, no kernel). Dense pools only.

        A view is valid only while its block stays referenced: the pool rewrites freed blocks in place.
        Evaluate the views under :attr:`storage_lock`, and keep a reference on the blocks (a handle)
        for as long as they live. Where the pool :attr:`writes_in_place`, a whole block's views are made
        once and kept by the pool (CPU, 1x12 rebuild: views made per call 0.10 ms -> 0.027 ms kept, against
        a 0.05 ms memcpy).
        """
        if self._quantized is not None:
            raise IncompatibleCacheError("quantized blocks have no dense view; gather them")
        if type(lo) is not int or type(hi) is not int or not 0 <= lo < hi <= self.spec.block_size:
            lo, hi = checked_int("lo", lo, 0), checked_int("hi", hi, 0)
            if not lo < hi <= self.spec.block_size:
                raise InvalidRequestError(f"slots [{lo}, {hi}) are not inside a block of {self.spec.block_size}")
        ids = self._checked_ids(block_ids)
        keys, values = self._keys, self._values
        whole = hi - lo == self.spec.block_size
        if whole and self.writes_in_place:
            return self._cached_whole_views(ids)
        if ids and ids == list(range(ids[0], ids[0] + len(ids))):  # the usual case: a store allocates a run
            keys, values = keys[ids[0] : ids[0] + len(ids)], values[ids[0] : ids[0] + len(ids)]
            if not whole:
                keys, values = keys[:, :, lo:hi], values[:, :, lo:hi]
            return list(zip(mx.split(keys, len(ids), axis=0), mx.split(values, len(ids), axis=0)))
        if whole:
            return [(keys[b : b + 1], values[b : b + 1]) for b in ids]
        return [(keys[b : b + 1, :, lo:hi], values[b : b + 1, :, lo:hi]) for b in ids]

    def _cached_whole_views(self, ids: List[int]) -> List[Tuple[mx.array, mx.array]]:
        """The kept views, each as a new handle (``__copy__``: no copy, it shares the evaluated array; 0.12 us
        against 0.26 through ``copy.copy``). ``a[i] = x`` rebinds the handle it is applied to (mlx-lm's
        ``update_and_fetch`` on a rebuilt cache does), so a kept one handed out would become that cache's
        copy, and later rebuilds of its block, another agent's too, would get that copy instead of the
        block."""
        cached = self._whole_views
        try:
            kept = list(map(cached.__getitem__, ids))
        except KeyError:
            made = {b: (self._keys[b : b + 1], self._values[b : b + 1]) for b in ids if b not in cached}
            mx.eval(list(made.values()))
            cached.update(made)
            kept = list(map(cached.__getitem__, ids))
        return [(keys.__copy__(), values.__copy__()) for keys, values in kept]

    def write_blocks(self, block_ids: Sequence[int], first_index: int, keys: mx.array, values: mx.array,
                     first_token: int) -> None:
        """Write tokens into fresh blocks (evaluated on return).

        ``keys``/``values`` are ``[1, heads, T, dim]`` holding token positions
        ``[first_token, first_token + T)``; ``block_ids`` receive the block indices
        ``first_index, first_index + 1, ...``. Slots outside the data are zeroed, so no
        earlier owner's data survives in a block.
        """
        self.write_many([(block_ids, first_index, keys, values, first_token)])

    def write_many(self, writes: Iterable[tuple]) -> None:
        """Several :meth:`write_blocks` calls, evaluated together. Each write is ``(block_ids, first_index,
        keys, values, first_token[, n_tokens])``: with ``n_tokens``, only the first ``n_tokens`` tokens of
        ``keys``/``values`` are data (a buffer longer than its tokens is passed as it is: slicing it would
        cost an operation per array).

        On CPU the blocks are written through NumPy views of the pool's arrays; on CUDA, in a dense pool,
        by one kernel writing every new block into the arrays (:func:`write_blocks_in_place`). Elsewhere
        each run of consecutive block ids is written as one slice of rows (a plain strided copy on every
        backend); :meth:`allocate` hands out consecutive ids whenever the free blocks hold such a run.
        """
        writes = [self._checked_write(write) for write in _sequence("writes", writes)]
        of_this_thread(lambda: mx.eval([array for write in writes for array in write[2:4]]), "keys or values")
        if all(type(write[0]) is list for write in writes):  # a store's own lists: one pass of C builtins for all
            ids = self._checked_ids(list(itertools.chain.from_iterable(write[0] for write in writes)))
        else:
            ids = [b for write in writes for b in self._block_array(write[0], 1).tolist()]
        with self._lock:
            self._check_writable(ids)
            pending = self._write_checked(writes, ids)
            if pending is not None:
                mx.eval(pending)

    def _write_checked(self, writes: List[tuple], ids: List[int], one_run: bool = False) -> Optional[mx.array]:
        """:meth:`write_many` of checked ``writes`` into ``ids`` (theirs, one after another), each held
        once (the lock held); ``one_run``: ids known to be consecutive, ascending. Returns the in-place kernel's output, queued but not evaluated (CUDA), for the
        caller to evaluate before anything reads or frees the blocks; None where the writes are done."""
        if not ids:
            return None
        host = writes_through_host()
        if not host and self.writes_in_place:
            sources, size = [(w[2], w[3]) for w in writes], self.spec.block_size
            described = _described_writes(writes, ids, one_run)
            if described is not None:
                return write_described_blocks_in_place(self._keys, self._values, sources, ids[0], *described, size)
            return write_blocks_in_place(self._keys, self._values, sources, _pack_plan(writes, size), size)
        if not host:  # MLX writes replace the arrays: views of the old ones would show old data
            self._whole_views.clear()
            self._host_views = None
        if self._quantized is not None:
            # No pack kernel on the host: its plan (a row per new block) would be built for nothing.
            if host or not self._write_packed(writes):
                self._quantized.write_many(writes)
        elif host:
            sources = host_views([a for w in writes for a in (w[2], w[3])])
            arenas = self._host_arenas()
            split_host_copies(lambda k: self._write_host(arenas, writes[k], sources[2 * k], sources[2 * k + 1]),
                              range(len(writes)), len(ids) * self.block_bytes)
        else:
            for write in writes:
                self._write_arena(*write)
            mx.eval(self._keys, self._values)

    def _checked_write(self, write) -> tuple:
        """``write`` with its token count, or a typed error: sources of another dtype or geometry would be
        stored as reinterpreted bits on the host path. Plain ints and arrays take one comparison (a store
        checks a write per layer)."""
        if type(write) is not tuple or len(write) not in (5, 6):
            raise InvalidRequestError("a write is (block_ids, first_index, keys, values, first_token[, n_tokens])")
        keys, values = write[2], write[3]
        if type(keys) is not mx.array or type(values) is not mx.array:
            raise InvalidRequestError(f"keys and values must be mx.array, got {type(keys).__name__} and "
                                      f"{type(values).__name__}")
        spec, k_shape = self.spec, keys.shape
        tokens = k_shape[2] if len(k_shape) == 4 else -1
        if not self._fits_blocks(k_shape, values.shape, keys.dtype, values.dtype):
            raise IncompatibleCacheError(
                f"keys {k_shape} and values {values.shape} of {keys.dtype} and {values.dtype} cannot be stored "
                f"in blocks of [1, {spec.n_kv_heads}, tokens, {spec.k_head_dim} / {spec.v_head_dim}] {spec.dtype}; "
                "store caches of this pool's model and dtype")
        n_tokens = write[5] if len(write) == 6 else tokens
        if not (type(write[1]) is int and type(write[4]) is int and type(n_tokens) is int
                and write[1] >= 0 and write[4] >= 0 and 0 <= n_tokens <= tokens):
            write = (write[0], checked_int("first_index", write[1], 0), keys, values,
                     checked_int("first_token", write[4], 0), checked_int("n_tokens", n_tokens, 0, tokens))
        elif len(write) == 5:
            write = (*write, tokens)
        self._check_span(write[0], write[1], write[4], write[5])
        return write

    def _fits_blocks(self, k_shape: tuple, v_shape: tuple, k_dtype: mx.Dtype, v_dtype: mx.Dtype) -> bool:
        """Whether keys and values of these shapes and dtypes are ``[1, heads, tokens, dim]`` of this pool's
        geometry and dtype: others would be stored as reinterpreted bits, or read out of bounds on CUDA."""
        spec = self.spec
        tokens = k_shape[2] if len(k_shape) == 4 else -1
        return (k_shape == (1, spec.n_kv_heads, tokens, spec.k_head_dim)
                and v_shape == (1, spec.n_kv_heads, tokens, spec.v_head_dim)
                and k_dtype == self._dtype and v_dtype == self._dtype)

    def _check_store_sources(self, writes: List[tuple]) -> None:
        """:meth:`_checked_write`'s checks of the arrays of :meth:`_HandleBuilder._write_store`'s writes, made
        once per distinct (shapes, dtypes, token count): a store's layers share one or two. Any mismatch
        goes through :meth:`_checked_write`, which names it."""
        if {(type(w[2]), type(w[3])) for w in writes} <= {(mx.array, mx.array)}:
            for k_shape, v_shape, k_dtype, v_dtype, n_tokens in {
                    (w[2].shape, w[3].shape, w[2].dtype, w[3].dtype, w[5]) for w in writes}:
                if not (self._fits_blocks(k_shape, v_shape, k_dtype, v_dtype) and 0 <= n_tokens <= k_shape[2]):
                    break
            else:
                return
        for write in writes:
            self._checked_write(write)
        raise AssertionError("a store's sources failed a check that each write's own checks passed")

    def _check_span(self, block_ids, first_index: int, first_token: int, n_tokens: int) -> None:
        """The blocks of a write hold its tokens' end, each block some of its tokens: more blocks would be left
        with an earlier owner's data, fewer would drop tokens. Tokens before the first block are not
        written (the blocks a store shares from its source hold them)."""
        try:
            n_blocks = len(block_ids)
        except TypeError:
            raise InvalidRequestError(f"block_ids must be a list of ids, got {type(block_ids).__name__}") from None
        size, end = self.spec.block_size, first_token + n_tokens
        if n_tokens == 0 and n_blocks == 0:
            return
        if n_tokens == 0 or n_blocks == 0 or not (
                first_token < (first_index + 1) * size and (first_index + n_blocks - 1) * size < end
                <= (first_index + n_blocks) * size):
            raise InvalidRequestError(
                f"{n_blocks} blocks from block index {first_index} (tokens {first_index * size}.."
                f"{(first_index + n_blocks) * size - 1}) do not fit "
                f"{f'tokens {first_token}..{end - 1}' if n_tokens else 'no tokens'}: give each block some of the "
                "tokens, the last block the last token")

    def _check_writable(self, block_ids: List[int], whole_blocks: bool = True) -> None:
        """``BlockOwnershipError`` unless every block is held exactly once (the lock held; queued releases
        drained first, so a block given back counts as free), and, for writes of ``whole_blocks``, named
        once: two writes of one block would race on CUDA (one kernel writes every block at once)."""
        if whole_blocks and len(set(block_ids)) != len(block_ids):
            block = next(b for b, n in collections.Counter(block_ids).items() if n > 1)
            raise BlockOwnershipError(f"block {block} is written twice in one call; give each write blocks of its own")
        self._drain()
        if not set(map(self._refcount.__getitem__, block_ids)) - {1}:
            writable = self._writable_blocks()
            block = next((b for b in block_ids if b not in writable), None)
            if block is None:
                return
            state = "held by a handle, or by a cache rebuilt from one"
        else:
            block = next(b for b in block_ids if self._refcount[b] != 1)
            state = "free" if self._refcount[block] == 0 else f"shared ({self._refcount[block]} references)"
        raise BlockOwnershipError(
            f"block {block} is {state}: only a block just allocated (allocate, or a builder's), held once, is "
            "written (a handle's blocks never change)")

    def _writable_blocks(self) -> set:
        """Blocks held by raw references (``allocate``) or by builders in progress: the holders that write.
        A handle's or a pin's blocks are only read (the lock held)."""
        writable = set(itertools.chain.from_iterable(self._loose_refs.values()))
        writable.update(itertools.chain.from_iterable(
            ids for owned in self._owned.values() for ids in owned.values() if type(ids) is _BuilderIds))
        return writable

    def _write_packed(self, writes) -> bool:
        """A quantized pool's new blocks cut from their sources by one kernel, quantized by one ``mx.quantize``
        per keys and values, then written as whole rows (one slice per run of consecutive ids): a handful of
        launches instead of several per layer. Returns False where the backend has no such kernel. Slots
        outside the data hold quantized zeros (they dequantize to 0)."""
        if not packs_blocks(writes[0][2], writes[0][3]):
            return False
        size = self.spec.block_size
        plan = _pack_plan(writes, size)
        packed_ids = plan[:, 4].tolist()
        parts = self._quantized.quantize(*pack_blocks([(w[2], w[3]) for w in writes], plan, size))
        arenas = self._quantized.arenas
        runs = list(id_runs(packed_ids, 0, len(packed_ids)))
        # Slices are written as wide words (new blocks are contiguous: viewing them costs nothing); MLX's CUDA
        # scatter, for a fragmented free list, takes the arena's own dtype. The arrays are replaced by their
        # written views before the evaluation: a reference to an old one left then would make MLX copy the
        # whole arena instead of writing it in place.
        for k, arena in enumerate(arenas):
            dtype = arena.dtype
            if len(runs) > _MAX_SLICE_WRITES:
                arena = _write_rows(arena, packed_ids, 0, runs, parts[k])
            else:
                arena = _write_rows(word_view(arena), packed_ids, 0, runs, word_view(parts[k]))
            arenas[k] = arena.view(dtype)
        del arena
        mx.eval(arenas)
        return True

    def _host_arenas(self) -> Tuple[np.ndarray, np.ndarray]:
        # Made once: the arrays are written only through these views, so their buffers never change,
        # and making a view costs ~0.15 ms (an evaluation) per call.
        if self._host_views is None:
            self._host_views = (host_view(self._keys), host_view(self._values))
        return self._host_views

    def _write_host(self, arenas, write: tuple, keys: np.ndarray, values: np.ndarray) -> None:
        """Write a checked write whose keys and values are ``keys`` and ``values`` (host views): its blocks'
        data, and zeros in their slots outside the data."""
        size = self.spec.block_size
        block_ids, first_index, _, _, first_token, n_tokens = write
        for lo, hi, a, b, seg_start in _segments(len(block_ids), first_index, first_token, n_tokens, size):
            for arena, data in zip(arenas, (keys, values)):
                rows = data[0, :, a - first_token : b - first_token, :]
                if b - a == (hi - lo) * size:
                    rows = rows.reshape(rows.shape[0], hi - lo, size, -1).transpose(1, 0, 2, 3)
                    for run_lo, run_hi, first_id in id_runs(block_ids, lo, hi):
                        arena[first_id : first_id + run_hi - run_lo] = rows[run_lo - lo : run_hi - lo]
                else:  # one partly filled block: zero the slots outside the data
                    arena[block_ids[lo]] = 0
                    arena[block_ids[lo], :, a - seg_start : b - seg_start, :] = rows

    def _write_arena(self, block_ids, first_index, keys, values, first_token, n_tokens) -> None:
        size = self.spec.block_size
        for lo, hi, a, b, seg_start in _segments(len(block_ids), first_index, first_token, n_tokens, size):
            pad = [(0, 0), (a - seg_start, seg_start + (hi - lo) * size - b), (0, 0)]
            runs = list(id_runs(block_ids, lo, hi))
            for arena_name, data in (("_keys", keys), ("_values", values)):
                chunk = data[0, :, a - first_token : b - first_token, :]
                if pad[1] != (0, 0):
                    chunk = mx.pad(chunk, pad)
                chunk = chunk.reshape(chunk.shape[0], hi - lo, size, chunk.shape[-1]).transpose(1, 0, 2, 3)
                _write_rows(getattr(self, arena_name), block_ids, lo, runs, chunk)

    @property
    def storage_lock(self) -> threading.RLock:
        """Held while the storage arrays are read or written; hold it to evaluate lazy :meth:`gather` results."""
        return self._lock

    def gather_rows(self, layer_block_ids: Sequence[Sequence[int]]) -> "GatherRows":
        """The row index :meth:`gather` reads for these blocks (``[layers, heads, n_blocks]``); callers that
        gather the same blocks again (an immutable handle) make it once and pass it as ``rows``."""
        spec = self.spec
        dense_block_bytes = spec.n_kv_heads * spec.block_size * (spec.k_head_dim + spec.v_head_dim) * spec.dtype_bytes
        return self._rows_fitting(layer_block_ids, dense_block_bytes)

    def _rows_fitting(self, layer_block_ids: Sequence[Sequence[int]], bytes_per_block: int) -> "GatherRows":
        """:meth:`gather_rows`, checked first against what MLX may still allocate for a result of
        ``bytes_per_block`` per listed block: it crashes, rather than raising, when it cannot get the memory
        (the same block listed many times makes a result larger than the pool)."""
        heads = self.spec.n_kv_heads
        ids = self._block_array(layer_block_ids, 2)
        if (needed := ids.size * bytes_per_block) and needed > (room := allocatable_bytes()):
            raise InvalidRequestError(
                f"gathering {ids.size} layer blocks takes {needed / 2**30:.1f} GiB, more than MLX may still "
                f"allocate here ({room / 2**30:.1f} GiB of mx.get_memory_limit()); gather fewer blocks at a time")
        rows = GatherRows(mx.array(ids[:, None, :] * heads + np.arange(heads, dtype=np.int32)[None, :, None]),
                          self.pool_id)
        self._issued_rows.add(rows)
        return rows

    def _checked_rows(self, rows) -> mx.array:
        """The index of ``rows``, made by this pool's :meth:`gather_rows` (the kernels read it unchecked: an
        index of a larger pool would read past the arrays)."""
        if type(rows) is not GatherRows or rows not in self._issued_rows:
            raise InvalidRequestError(
                f"rows must be what this pool's gather_rows returned (pool #{self.pool_id}), got "
                f"{type(rows).__name__}" + (f" of pool #{rows.pool_id}" if type(rows) is GatherRows else "")
                + " (made or changed elsewhere, or another pool's)")
        return rows.index

    def gather(self, layer_block_ids: Sequence[Sequence[int]] = (), *, evaluate: bool = True,
               rows: Optional["GatherRows"] = None) -> Tuple[mx.array, mx.array]:
        """Keys and values of several layers that keep the same number of blocks,
        ``[layers, heads, n_blocks * block_size, dim]``, in one row-gather kernel for both. With
        ``evaluate=False`` the caller evaluates them, under :attr:`storage_lock`. ``rows``, from
        :meth:`gather_rows`, replaces ``layer_block_ids``.

        The arena is viewed as ``[blocks * heads, block_size, dim]`` rows, so a single
        index array ``[layers, heads, n_blocks]`` puts every row straight where the
        cache wants it (see ``adapters.mlx_kernels`` for how each backend copies rows).
        """
        spec = self.spec
        rows = self._checked_rows(self.gather_rows(layer_block_ids) if rows is None else rows)
        n_layers, heads, n_blocks = rows.shape
        tokens = n_blocks * spec.block_size
        with self._lock:
            if not n_layers * n_blocks:
                keys, values = self._nothing_gathered((n_layers, heads, 0))
            elif self._quantized is not None:
                keys, values = self._quantized.gather(rows)
            else:
                keys, values = gather_row_pairs(
                    self._keys.reshape(-1, spec.block_size, spec.k_head_dim),
                    self._values.reshape(-1, spec.block_size, spec.v_head_dim), rows,
                )
                keys = keys.reshape(n_layers, heads, tokens, spec.k_head_dim)
                values = values.reshape(n_layers, heads, tokens, spec.v_head_dim)
            if evaluate:
                mx.eval(keys, values)
        return keys, values

    def _nothing_gathered(self, shape: Tuple[int, int, int]) -> Tuple[mx.array, mx.array]:
        """Empty keys and values of ``shape + (dim,)``: a gather of no rows launches no kernel (CUDA refuses a
        launch of no thread blocks; mx.dequantize cannot reshape an empty array)."""
        dtype = getattr(mx, self.spec.dtype)
        return mx.zeros(shape + (self.spec.k_head_dim,), dtype), mx.zeros(shape + (self.spec.v_head_dim,), dtype)

    def gather_apart(self, rows: "GatherRows") -> List[Tuple[mx.array, mx.array]]:
        """:meth:`gather` of ``rows`` per layer, lazy (evaluate under :attr:`storage_lock`): keys and values
        ``[1, heads, n_blocks * block_size, dim]``, each array in a buffer of its own. MLX updates an array
        in place only while no other array shares its buffer, and :meth:`gather`'s layers, split, share
        one: mlx-lm's batch, writing a prompt after a lone rebuilt context, would copy each layer whole.
        One kernel on CUDA (dequantizing, for quantized pools); elsewhere an operation per array."""
        spec = self.spec
        rows = self._checked_rows(rows)
        n_layers, heads, n_blocks = rows.shape
        tokens = n_blocks * spec.block_size
        shapes = (1, heads, tokens, spec.k_head_dim), (1, heads, tokens, spec.v_head_dim)
        if not n_layers * n_blocks:
            return [self._nothing_gathered((1, heads, 0)) for _ in range(n_layers)]
        with self._lock:
            if self._quantized is not None:
                return self._quantized.gather_apart(rows, *shapes)
            return gather_row_pairs_apart(self._keys.reshape(-1, spec.block_size, spec.k_head_dim),
                                          self._values.reshape(-1, spec.block_size, spec.v_head_dim), rows, *shapes)

    # ---- stored form (files hold blocks as the pool stores them) ----------------------------------
    def gather_stored(self, layer_block_ids: Sequence[Sequence[int]]) -> List[mx.array]:
        """Like :meth:`gather`, but the blocks as stored, one array per ``spec.stored_parts`` entry,
        ``[layers, heads, n_blocks * block_size, width]`` (evaluated): keys and values for dense
        blocks, the packed parts for quantized ones."""
        if self._quantized is None:
            return list(self.gather(layer_block_ids))
        rows = self._rows_fitting(layer_block_ids, self.spec.bytes_per_block_per_layer).index
        with self._lock:
            parts = self._quantized.gather_stored(rows)
            mx.eval(parts)
        return parts

    def write_stored(self, writes: Iterable[StoredWrite]) -> None:
        """Write blocks given in their stored form (what :meth:`gather_stored` returned), without
        converting them: a quantized block read from a file is the block that was saved. Each write is
        ``(block_ids, first_index, parts, first_token)``, ``parts`` one array per :attr:`ModelCacheSpec.stored_parts
        <semantic.domain.value_objects.ModelCacheSpec.stored_parts>`."""
        writes = _sequence("writes", writes)
        names = [part.name for part in self.spec.stored_parts]
        for write in writes:
            if type(write) is not tuple or len(write) != 4 or not isinstance(write[2], (list, tuple)):
                raise InvalidRequestError(
                    f"a stored write is a tuple (block_ids, first_index, parts, first_token), parts a list of "
                    f"arrays, got {type(write).__name__}"
                    + (f" of {[type(item).__name__ for item in write]}" if isinstance(write, tuple) else ""))
            if len(write[2]) != len(names):
                raise IncompatibleCacheError(f"{len(write[2])} stored parts for a pool of "
                                             f"{self.spec.block_format.name} blocks, stored as {names}")
        if self._quantized is None:
            self.write_many([(ids, first_index, parts[0], parts[1], first_token)
                             for ids, first_index, parts, first_token in writes])
            return
        parts_wanted = [(getattr(mx, part.dtype), part.width) for part in self.spec.stored_parts]
        ids, checked = [], []
        for block_ids, first_index, parts, first_token in writes:
            ids.extend(self._block_array(block_ids, 1).tolist())
            first_index = checked_int("first_index", first_index, 0)  # NumPy or 0-d MLX ints as plain ints
            first_token = checked_int("first_token", first_token, 0)
            checked.append((block_ids, first_index, parts, first_token))
            if len(parts) != len(parts_wanted) or any(
                    type(part) is not mx.array or part.dtype != dtype or part.ndim != 4
                    or part.shape[:2] != (1, self.spec.n_kv_heads) or part.shape[2:] != (parts[0].shape[2], width)
                    for part, (dtype, width) in zip(parts, parts_wanted)):
                raise IncompatibleCacheError(
                    f"stored parts {[(tuple(p.shape), p.dtype) for p in parts if type(p) is mx.array]} are not "
                    f"this pool's {self.spec.block_format.name} blocks ([1, {self.spec.n_kv_heads}, tokens, "
                    f"width] per part: {[(p.width, p.dtype) for p in self.spec.stored_parts]})")
            self._check_span(block_ids, first_index, first_token, parts[0].shape[2])
        with self._lock:
            self._check_writable(ids)
            self._quantized.write_stored(checked)

    def _checked_row_copy(self, copy) -> RowCopy:
        size = self.spec.block_size
        if type(copy) is not tuple or len(copy) != 4 or not all(map(is_int, copy)) or not (
                0 <= copy[2] <= copy[3] <= size):
            raise InvalidRequestError(f"a row copy is (to_block, from_block, first_slot, end_slot), ints with "
                                      f"0 <= first_slot <= end_slot <= {size}, got {shown(copy)}")
        return tuple(map(int, copy))

    def copy_token_rows(self, copies: Sequence[RowCopy], of: Optional[AgentBlocks] = None) -> None:
        """Copy token slots of used blocks into fresh blocks, as stored. For quantized blocks, whose
        tokens must be quantized only once; dense blocks rebuild bit-exact, so writing them is the same.
        ``of``: the live handle the source blocks were read from, checked again under the pool's lock."""
        if self._quantized is None:
            raise IncompatibleCacheError("copy_token_rows is for quantized blocks; write dense blocks with write_many")
        copies = [self._checked_row_copy(copy) for copy in _sequence("copies", copies)]
        self._block_array([c[0] for c in copies] + [c[1] for c in copies], 1)
        with self._lock:
            if of is not None:
                self.check_handle(of)
            self._check_writable([int(c[0]) for c in copies], whole_blocks=False)  # a block's slots, copy by copy
            if 0 in map(self._refcount.__getitem__, (int(c[1]) for c in copies)):
                raise BlockOwnershipError("a row is copied from a free block; copy only from blocks in use")
            self._quantized.copy_rows(copies)

    def __repr__(self) -> str:
        u = self.usage()
        return f"BlockPool(#{self.pool_id}, {u.used_blocks}/{u.total_blocks} used, {self.spec.describe()})"


@dataclass(frozen=True, eq=False)
class GatherRows:
    """A row index made by :meth:`BlockPool.gather_rows`: ``index`` ``[layers, heads, n_blocks]`` (int32) and
    the pool it is valid for. A pool's gathers take only the very objects its ``gather_rows`` made (compared
    by identity): the kernels read the index unchecked, and one made or edited by hand (``dataclasses.replace``)
    could read outside the pool's arrays."""

    index: mx.array
    pool_id: int


def _ensure_buffer_cache(nbytes: int) -> None:
    """Let MLX keep at least ``nbytes`` of freed buffers for reuse (never lowers the limit).

    MLX's CPU backend caches only a few MiB of freed buffers by default, so every
    rebuild larger than that writes into freshly mapped pages and page-faults on
    each one: measured 4-10x slower than memcpy of the same bytes. A rebuild never
    produces more than the pool holds. Only freed buffers are kept, so this costs
    memory only after rebuilds have been freed.
    """
    previous = mx.set_cache_limit(nbytes)
    if previous > nbytes:
        mx.set_cache_limit(previous)


@functools.lru_cache(maxsize=1024)
def _segments(n_blocks: int, first_index: int, first_token: int, n_tokens: int, size: int) -> Tuple[tuple, ...]:
    """Split blocks ``[0, n_blocks)`` into runs that need the same padding: a partly filled first
    block, the whole blocks, a partly filled last block. Whole blocks are then written without
    a padded copy. Per run: ``(lo, hi, first data token, end data token, first slot's token)``.
    Memoised: a store's layers of one window ask the same."""
    cuts = {0, n_blocks}
    for token in (first_token, first_token + n_tokens):
        if token % size:  # inside a block: that block is a run of its own
            block = token // size - first_index
            cuts.update((block, block + 1))
    cuts = sorted(c for c in cuts if 0 <= c <= n_blocks)
    end_token = first_token + n_tokens
    return tuple((lo, hi, max((first_index + lo) * size, first_token), min((first_index + hi) * size, end_token),
                  (first_index + lo) * size) for lo, hi in zip(cuts, cuts[1:]))


def _described_writes(writes, ids: List[int], one_run: bool) -> Optional[
        Tuple[Tuple[int, ...], Tuple[Tuple[int, int, int, int], ...]]]:
    """``(layouts, described)`` for :func:`write_described_blocks_in_place`: each write's layout index, and the
    distinct layouts ``(first block index, first token, token count, block count)``; None unless ``ids`` are
    one run of consecutive ids and the writes have at most ``MAX_DESCRIBED_LAYOUTS`` layouts (a store has one
    per window). ``one_run``: known to be (a store's single allocation, taken from one free run), so not
    compared: comparing 480 ids with a range took a 16 x 30 store 12 us (CPU)."""
    first = ids[0]
    if not one_run and (ids[-1] - first != len(ids) - 1 or ids != list(range(first, first + len(ids)))):
        return None
    kinds: Dict[Tuple[int, int, int, int], int] = {}
    layouts = tuple(kinds.setdefault((w[1], w[4], w[5], len(w[0])), len(kinds)) for w in writes)
    return (layouts, tuple(kinds)) if len(kinds) <= MAX_DESCRIBED_LAYOUTS else None


def _pack_plan(writes, size: int) -> np.ndarray:
    """What the pack kernel cuts for ``writes`` (:meth:`BlockPool.write_many`'s, with their token counts): per
    block, the row ``(source write, the source token in its slot 0, first data slot, end data slot, block id)``
    of an int32 ``[n, 5]`` plan. A store's writes share a few layouts (one per window), so each layout's rows
    are made once and stacked: building the rows per block, then per write, cost a 16 x 30 store 0.2 ms,
    then 36 us (CPU), and this 22 us."""
    rows = [_plan_rows(write[1], write[4], write[5], len(write[0]), size) for write in writes]
    plan = np.concatenate(rows)
    plan[:, 0] = np.repeat(np.arange(len(writes), dtype=np.int32), [len(r) for r in rows])
    plan[:, 4] = np.fromiter(itertools.chain.from_iterable(write[0] for write in writes), np.int32, len(plan))
    return plan


@functools.lru_cache(maxsize=256)
def _plan_rows(first_index: int, first_token: int, n_tokens: int, n_blocks: int, size: int) -> np.ndarray:
    """:func:`_pack_plan`'s rows for one write, source and block id left 0 (read-only: shared by calls)."""
    first = (first_index + np.arange(n_blocks)) * size - first_token
    rows = np.zeros((n_blocks, 5), np.int32)
    rows[:, 1] = first
    rows[:, 2] = np.maximum(-first, 0)
    rows[:, 3] = np.minimum(n_tokens - first, size)
    rows.flags.writeable = False
    return rows


_MAX_SLICE_WRITES = 4
"""Runs of consecutive block ids per segment written as slices; more runs are written by one scatter."""


def _write_rows(arena: mx.array, block_ids: Sequence[int], lo: int, runs, rows: mx.array) -> mx.array:
    """``rows[k]`` into block ``block_ids[lo + k]`` of ``arena``, in place (the arena is donated): one slice
    per run of consecutive ids (``runs`` from :func:`~semantic.domain.free_runs.id_runs`), or, for a
    fragmented free list, one row scatter instead of many small copies. Returns ``arena``, written."""
    if len(runs) <= _MAX_SLICE_WRITES:
        for run_lo, run_hi, first_id in runs:
            arena[first_id : first_id + run_hi - run_lo] = rows[run_lo - lo : run_hi - lo]
    else:
        arena[mx.array(block_ids[lo : lo + rows.shape[0]])] = rows
    return arena


def _subtract(table: Dict[str, collections.Counter], agent_id: str, counts: Dict[int, int]) -> None:
    """Take ``counts`` references off ``agent_id``'s (which hold at least that many), forgetting blocks
    at zero and the agent once it holds none. Not ``Counter.subtract``: that and ``Counter``'s deletes
    run in Python, ~3x slower on the thousand blocks of a long context."""
    counter = table[agent_id]
    get = counter.get
    for b, n in counts.items():
        left = get(b, 0) - n
        if left > 0:
            counter[b] = left
        else:
            counter.pop(b, None)
    if not counter:
        del table[agent_id]


def _sequence(name: str, value) -> list:
    """``value`` as a list, if it is a list, tuple, range or 1-d array (not a str, bytes or an iterator,
    which would read as characters or be consumed by the first pass)."""
    if isinstance(value, (list, tuple, range)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return list(value)
    raise InvalidRequestError(f"{name} must be a list or tuple, got {type(value).__name__}")


def _int_list(name: str, value) -> List[int]:
    return int_items(_sequence(name, value), name)


def _int_tuples(name: str, lists: list) -> List[Tuple[int, ...]]:
    """Each of ``lists`` as :func:`_int_list` checks it, as a tuple. Lists and tuples of plain ints (a store's
    one per layer) are checked in one pass over all of them; anything else, one by one, naming the culprit."""
    tuples = [tuple(ids) if type(ids) in (list, tuple) else None for ids in lists]
    if None in tuples or not plain_ints(itertools.chain.from_iterable(tuples)):
        tuples = [tuple(_int_list(f"{name}[{i}]", ids)) for i, ids in enumerate(lists)]
    return tuples


def _check_agent_id(agent_id) -> None:
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")
