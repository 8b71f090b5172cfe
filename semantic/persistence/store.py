"""``AgentCacheStore``: every agent's context, in the pool while it is in use, on disk when it is not.

Two tiers:

* Disk: one checked file per agent (``save`` / ``load`` / ``delete`` / ``list``),
  written crash-safely; any number of processes may share the directory.
* Memory: agents kept in the pool as blocks (``put`` / ``get``), up to
  ``memory_budget_bytes``. When the budget is exceeded, or the pool has no room
  for a load or for the engine (``make_room``), the least recently used agents
  are written to disk (unless their file already holds them) and their blocks
  released. ``get`` of an agent that is only on disk reads its file into newly
  allocated pool blocks.

Each agent has one current context: the last one given to ``put`` or ``save``.
``get`` returns it; ``load`` returns what the agent's file holds, which is what
a restarted process would see. A context given to ``put`` reaches the disk when
it is evicted, on ``flush`` / ``close``, or at once with ``write_through=True``:
after a crash, only contexts ``put`` since then are lost, and with
``write_through`` none. Memory tiers of two processes sharing a directory are
not kept coherent; the last save of an agent wins.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import threading
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, OrderedDict, Tuple

from semantic.domain.entities import AgentBlocks
from semantic.domain.errors import (IncompatibleCacheError, InvalidRequestError, PoolExhaustedError,
                                    UnknownRequestError)
from semantic.domain.request_checks import checked_int, shown
from semantic.domain.services import BlockPool
from semantic.persistence.directory import CacheDirectory, check_agent_id
from semantic.persistence.errors import CacheBudgetWarning, CachePersistenceError, CacheWriteError, read_error
from semantic.persistence.file_format import (MAX_TOKEN_ID, AgentCacheHeader, geometry_of, read_agent_cache,
                                              write_agent_cache)
from semantic.persistence.fingerprint import model_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import mlx.core as mx

    from semantic.application.batch_engine import BlockPoolBatchEngine, Completion


@dataclass
class _Resident:
    handle: AgentBlocks  # the store's own reference
    on_disk: bool  # the agent's file holds exactly this context


@dataclass
class _Loading:
    readers: int = 0  # gets reading the agent's file now
    file_changes: int = 0  # writes and deletes of the file by this store since the first of them began


class AgentCacheStore:
    """Agents' contexts in ``pool`` and in ``directory``; see the module docstring.

    Thread-safe, except :meth:`generate`, which drives an engine: call it from the thread that drives
    that engine (see ``BlockPoolBatchEngine``). A call that waits for an agent's file lock held by another
    process lets go of the store while it waits, so calls on other agents go on. Every method raises a
    typed ``SemanticError`` and changes nothing when it fails (evictions done to make room stay done: they
    only move contexts to disk; ``flush`` and ``close`` write and release every agent they can before
    raising for the others).
    """

    def __init__(self, directory, pool: BlockPool, model_fingerprint: str, *,
                 memory_budget_bytes: Optional[int] = None, write_through: bool = False, lock_timeout: float = 30.0):
        if not isinstance(pool, BlockPool):
            raise InvalidRequestError(f"pool must be a BlockPool, got {type(pool).__name__}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint or not model_fingerprint.isprintable():
            raise InvalidRequestError(
                "model_fingerprint must be a non-empty printable string (see model_fingerprint()), "
                f"got {shown(model_fingerprint)}"
            )
        if memory_budget_bytes is not None:
            memory_budget_bytes = checked_int("memory_budget_bytes", memory_budget_bytes, 0)
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
            raise InvalidRequestError(f"lock_timeout must be a number of seconds >= 0, got {shown(lock_timeout)}")
        lock_timeout = float(lock_timeout) if lock_timeout < 1e300 else math.inf  # an int of 10**400 has no float
        if not isinstance(write_through, bool):
            raise InvalidRequestError(f"write_through must be True or False, got {shown(write_through)}")
        self.pool = pool
        self.model_fingerprint = model_fingerprint
        self.memory_budget_bytes = memory_budget_bytes
        self.write_through = write_through
        self._lock = threading.RLock()
        self._directory = CacheDirectory(directory, lock_timeout, wait=threading.Condition(self._lock).wait)
        self._resident: OrderedDict[str, _Resident] = collections.OrderedDict()  # least recently used first
        self._loading: Dict[str, _Loading] = {}  # agents whose file a get is reading

    @classmethod
    def for_engine(cls, directory, engine: "BlockPoolBatchEngine", **kwargs) -> "AgentCacheStore":
        """A store for ``engine``'s pool, fingerprinted with its model and tokenizer."""
        from semantic.application.batch_engine import BlockPoolBatchEngine  # already loaded where an engine exists

        if not isinstance(engine, BlockPoolBatchEngine):
            raise InvalidRequestError(f"engine must be a BlockPoolBatchEngine, got {type(engine).__name__}")
        return cls(directory, engine.pool, model_fingerprint(engine.model, engine.tokenizer), **kwargs)

    @property
    def directory(self):
        return self._directory.path

    @property
    def resident(self) -> Tuple[str, ...]:
        """Agents held in the pool, least recently used first."""
        with self._lock:
            return tuple(self._resident)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the distinct blocks the store holds (a block shared by two agents counts once)."""
        with self._lock:
            return len(self._resident_block_refs()) * self.pool.block_bytes

    # ---- disk tier --------------------------------------------------------------------------------
    def save(self, agent_blocks: AgentBlocks) -> None:
        """Write the context to the agent's file now; durable when this returns. The handle stays yours.
        It becomes the agent's current context (replacing a resident one)."""
        handle = self._checked_handle(agent_blocks)
        # Our own reference while the file is written: a release elsewhere meanwhile must not let the
        # blocks be reused (the file would hold another agent's data, under valid checksums).
        with self._lock, handle.share() as pinned:
            self._write(pinned, adopt=lambda: pinned.agent_id in self._resident)
            if pinned.agent_id in self._resident:
                self._enforce_budget()

    def load(self, agent_id: str) -> AgentBlocks:
        """The context in the agent's file, read into new pool blocks: a handle for you to release.
        Reads the file even if the agent is resident (``get`` returns the current context)."""
        with self._lock:
            handle = self._read_into_pool(agent_id)
            handle.vouched_for = self.model_fingerprint  # what the file's fingerprint was checked against
            return handle

    def delete(self, agent_id: str) -> bool:
        """Forget the agent in both tiers; whether the store had it."""
        check_agent_id(agent_id)  # before the finally below meets a non-string (unhashable: TypeError)
        with self._lock:
            try:
                # Forgotten in memory as soon as the file is gone, even if the sync then fails or an interrupt comes.
                existed = self._directory.remove(agent_id, removed=lambda: self._drop_resident(agent_id))
            finally:
                self._file_changed(agent_id)
            return self._drop_resident(agent_id) or existed

    def list(self) -> List[str]:
        """Every agent the store holds, in memory or on disk, sorted."""
        with self._lock:
            return sorted(set(self._resident) | set(self._directory.agent_ids()))

    def __contains__(self, agent_id: str) -> bool:
        check_agent_id(agent_id)  # a typed error for a non-string, before it meets the dict
        with self._lock:
            if agent_id in self._resident:
                return True
            try:  # as list() counts them: a directory, FIFO or link at the name is no agent's file
                return self._directory.has_file(agent_id)
            except OSError as exc:  # a directory that may not be searched: as get() says, not a bare OSError
                raise read_error(self._directory.file_for(agent_id), exc) from exc

    # ---- memory tier ------------------------------------------------------------------------------
    def put(self, agent_blocks: AgentBlocks) -> None:
        """Make the handle the agent's current context, kept in the pool: the store takes the handle over
        (it is released when this returns; the store keeps a share of its own, which no release of yours
        can reach). If this raises, the handle is still yours (if ``write_through`` had replaced the agent's
        file, by a ``CacheSyncError`` or an interrupt, the store holds a share of it as the current context, as
        ``save`` does)."""
        handle = self._checked_handle(agent_blocks)
        with self._lock:
            if self.write_through:
                self._write(handle, adopt=lambda: True)
            else:
                self._set_resident(handle.agent_id, handle.share(), on_disk=False)
            self._enforce_budget()  # raises only as a warning turned into an error: the handle stays yours then
            handle.release()

    def get(self, agent_id: str) -> AgentBlocks:
        """A new handle on the agent's current context, for you to release; read from disk into the pool
        if it is not resident (evicting least recently used agents to make room)."""
        with self._lock:
            check_agent_id(agent_id)
            if agent_id not in self._resident:
                self._load_resident(agent_id)
            self._resident.move_to_end(agent_id)
            shared = self._resident[agent_id].handle.share()
            # The store's fingerprint vouches for the model, as for a context read from its file: an engine of
            # another object of the same model (a reloaded one) takes it, an engine of another model refuses it.
            shared.computed_by = None
            shared.vouched_for = self.model_fingerprint
            try:
                self._enforce_budget()
            except BaseException:  # a budget warning turned into an error: the handle was never yours
                shared.release()
                raise
            return shared

    def evict(self, agent_id: str) -> bool:
        """Move the agent out of the pool (written to disk first if its file is not current); whether it was resident.
        A context given to the agent while the write waited for another process's lock stays resident."""
        with self._lock:
            check_agent_id(agent_id)
            if agent_id not in self._resident:
                return False
            self._evict(agent_id)
            return True

    def make_room(self, n_blocks: int) -> bool:
        """Evict least recently used agents until the pool has ``n_blocks`` available. Returns False, evicting
        nothing, if even evicting every agent could not (handles held elsewhere pin their blocks)."""
        n_blocks = checked_int("n_blocks", n_blocks, 0)
        with self._lock:
            return self._make_room(n_blocks)

    def _make_room(self, n_blocks: int, keep: Optional[str] = None) -> bool:
        """``make_room``, never evicting agent ``keep``."""
        if self.pool.available_blocks >= n_blocks:
            return True
        refs = self._resident_block_refs()
        reclaimable = sum(1 for block, count in refs.items() if self.pool.refcount(block) == count)
        if self.pool.available_blocks + reclaimable < n_blocks:
            return False
        failures = self._evict_until(lambda: self.pool.available_blocks >= n_blocks, keep)
        if self.pool.available_blocks >= n_blocks:
            return True
        if failures:
            raise _write_failures(failures, f"could not free {n_blocks} blocks")
        return False  # another thread took blocks meanwhile

    def flush(self) -> None:
        """Write every resident agent whose file is not current. An agent whose file cannot be written
        stays resident, unsaved, and the others are still written; then the failures are raised."""
        with self._lock:
            failures = []
            for agent_id, resident in list(self._resident.items()):
                if resident.on_disk:
                    continue
                try:
                    self._write(resident.handle, current=resident)
                except CachePersistenceError as exc:
                    failures.append((agent_id, exc))
            if failures:
                raise _write_failures(failures, "flush")

    def close(self) -> None:
        """``flush``, then release every resident agent's blocks. An agent whose file could not be written
        keeps its blocks (releasing them would lose its context) and the failure is raised after the
        others are released. The store stays usable."""
        with self._lock:
            try:
                self.flush()
            finally:
                for agent_id in [agent for agent, resident in self._resident.items() if resident.on_disk]:
                    self._drop_resident(agent_id)

    def __enter__(self) -> "AgentCacheStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- with the engine --------------------------------------------------------------------------
    def generate(self, engine: "BlockPoolBatchEngine", agent_id: str, prompt, **submit_kwargs) -> "Completion":
        """One turn of ``agent_id`` on ``engine``: continue its stored context (if any) with ``prompt``, and
        keep the result as its current context. While the request waits for blocks, least recently used
        agents are moved to disk. Like ``engine.generate``, other requests run along and their completions
        come with the next ``engine.step()``. The returned completion's ``blocks`` are yours. Arguments
        ``engine.submit`` would refuse raise its ``InvalidRequestError`` before the agent's context is fetched.
        ``PoolExhaustedError`` (the request cancelled) if handles held outside the store (completions waiting
        for your next ``step()`` among them) pin the blocks it needs; ``UnknownRequestError`` if the request was
        cancelled (``engine.cancel``, ``engine.close``, from another thread) before it finished. With
        ``write_through``, a failed write raises its error after the turn: the new context stays resident
        (written by the next ``flush``) and the error's ``completion`` is the turn's."""
        from semantic.application.batch_engine import BlockPoolBatchEngine  # already loaded

        if not isinstance(engine, BlockPoolBatchEngine):  # else an AttributeError below
            raise InvalidRequestError(f"engine must be a BlockPoolBatchEngine, got {type(engine).__name__}")
        if engine.pool is not self.pool:
            raise IncompatibleCacheError("the engine uses another pool than this store; use one pool for both")
        if "cache" in submit_kwargs:
            raise InvalidRequestError("generate continues the agent's stored context itself: pass no cache=")
        try:
            inspect.signature(engine.submit).bind(agent_id, prompt, **submit_kwargs)
        except TypeError as exc:
            raise InvalidRequestError(f"generate passes its keywords to engine.submit, which says: {exc}") from None
        stored = agent_id in self
        # Checked before get(): that reads the file into the pool and may move other agents to disk.
        engine.check_request(agent_id, prompt, stored, **submit_kwargs)
        cache = self.get(agent_id) if stored else None
        try:
            uid = engine.submit(agent_id, prompt, cache=cache, **submit_kwargs)
        finally:
            if cache is not None:
                cache.release()
        result = None
        try:
            # step() returned with our request still waiting: free at least one more block and retry.
            result = engine.wait_for(uid, make_room=lambda: self.make_room(self.pool.available_blocks + 1))
            if result is None:
                raise PoolExhaustedError(
                    self.pool.available_blocks + 1, self.pool.available_blocks,
                    f"(agent {agent_id!r} waits for blocks that handles held outside the store pin (yours, or "
                    "completions of other requests waiting for your next step()); release them or use a larger "
                    "pool)",
                )
        except BaseException:  # no room, an eviction that could not write, an interrupt: the request holds blocks
            if result is None:
                with contextlib.suppress(UnknownRequestError):  # a step that raised had ended it already
                    engine.cancel(uid)
            raise
        # put takes the share over when it succeeds; when it raises the share is still ours, released on the way out.
        with result.blocks.share() as kept:
            try:
                self.put(kept)
            except CachePersistenceError as exc:  # write_through's write failed: keep the turn in memory, say so
                with self._lock:
                    self._set_resident(agent_id, kept.share(), on_disk=False)
                exc.completion = result
                raise
        return result

    # ---- internals --------------------------------------------------------------------------------
    def _checked_handle(self, agent_blocks: AgentBlocks) -> AgentBlocks:
        """A live handle of this pool whose blocks fit its tokens: a file of another layout could be written
        but never read back (the handle's context would be lost once its blocks were released)."""
        self.pool.check_handle(agent_blocks)
        check_agent_id(agent_blocks.agent_id)
        held = tuple(len(ids) for ids in agent_blocks.all_block_ids)
        expected = self.pool.spec.blocks_per_layer(agent_blocks.num_tokens)
        if held != expected:
            raise InvalidRequestError(
                f"agent {agent_blocks.agent_id!r}: blocks per layer {list(held)} do not fit a context of "
                f"{agent_blocks.num_tokens} tokens ({list(expected)}); store handles made by cache_to_blocks "
                "or the engine")
        if agent_blocks.token_ids and max(agent_blocks.token_ids) > MAX_TOKEN_ID:
            # Checked here, not at write time: an agent that could not be written would fail every later
            # eviction, and with it every put and get that needs room.
            raise InvalidRequestError(  # not the id itself: str() of an int of 5,000 digits raises
                f"agent {agent_blocks.agent_id!r}: a token id is above {MAX_TOKEN_ID}, the largest an agent's "
                "file holds; no tokenizer makes such ids")
        return agent_blocks

    def _set_resident(self, agent_id: str, handle: AgentBlocks, on_disk: bool) -> _Resident:
        """Make ``handle`` (the store's own reference: released here if this fails) the agent's resident context,
        most recently used. The new entry goes in before the previous one is let go, so an interrupt at any point
        leaves the agent resident, with one of the two."""
        previous = self._resident.get(agent_id)
        try:
            resident = self._resident[agent_id] = _Resident(handle, on_disk)
        except BaseException:
            handle.release()
            raise
        self._resident.move_to_end(agent_id)
        if previous is not None and previous.handle is not handle:
            previous.handle.release()
        return resident

    def _drop_resident(self, agent_id: str) -> bool:
        """Release the agent's blocks, if resident, without writing them; whether it was."""
        resident = self._resident.pop(agent_id, None)
        if resident is not None:
            resident.handle.release()
        return resident is not None

    def _evict(self, agent_id: str) -> None:
        resident = self._resident.get(agent_id)
        if resident is None:
            return
        if not resident.on_disk:
            self._write(resident.handle, current=resident)  # if this fails the agent stays resident: nothing lost
        if self._resident.get(agent_id) is resident and resident.on_disk:  # not replaced while the write waited
            del self._resident[agent_id]
            resident.handle.release()

    def _enforce_budget(self) -> None:
        """Evict down to the budget. It runs after a put, get or save has succeeded, so an agent that cannot
        be written is not that call's failure: it stays resident, with a ``CacheBudgetWarning``."""
        if self.memory_budget_bytes is None:
            return
        failures = self._evict_until(lambda: self.resident_bytes <= self.memory_budget_bytes)
        if failures and self.resident_bytes > self.memory_budget_bytes:
            warnings.warn("over the memory budget: agents that could not be written stay in the pool "
                          f"({_reasons(failures)})", CacheBudgetWarning, stacklevel=3)

    def _evict_until(self, enough, keep: Optional[str] = None) -> List[Tuple[str, CachePersistenceError]]:
        """Evict least recently used agents until ``enough()``, passing over any whose file cannot be written
        (it stays resident: one such agent must not keep the others from moving). Returns those failures."""
        failures, tried = [], {keep}
        while not enough():
            # The residents are read again after each eviction: one that waited for a lock let others change them.
            agent_id = next((agent for agent in self._resident if agent not in tried), None)
            if agent_id is None:
                break
            tried.add(agent_id)
            try:
                self._evict(agent_id)
            except CachePersistenceError as exc:
                failures.append((agent_id, exc))
        return failures

    def _load_resident(self, agent_id: str) -> None:
        """Read the agent's file into the pool as its resident context. Making room may wait for a lock,
        letting go of the store: if another thread makes the agent resident meanwhile, theirs is current; if
        it saves the agent, the file is read again. Making room never evicts the agent being loaded."""
        loading = self._loading.setdefault(agent_id, _Loading())
        loading.readers += 1
        try:
            while agent_id not in self._resident:
                changes = loading.file_changes
                try:
                    loaded = self._read_into_pool(agent_id, keep=agent_id)
                except (PoolExhaustedError, CachePersistenceError):
                    if agent_id in self._resident:
                        return
                    raise
                if agent_id in self._resident or loading.file_changes != changes:
                    loaded.release()
                else:
                    self._set_resident(agent_id, loaded, on_disk=True)
        finally:
            loading.readers -= 1
            if not loading.readers:
                del self._loading[agent_id]

    def _file_changed(self, agent_id: str) -> None:
        if agent_id in self._loading:
            self._loading[agent_id].file_changes += 1

    def _resident_block_refs(self) -> Dict[int, int]:
        """Block id -> references the store's handles hold on it."""
        refs: Dict[int, int] = defaultdict(int)
        for resident in self._resident.values():
            for ids in resident.handle.all_block_ids:
                for block in ids:
                    refs[block] += 1
        return refs

    def _write(self, handle: AgentBlocks, current: Optional[_Resident] = None,
               adopt: Callable[[], bool] = lambda: False) -> None:
        """Write ``handle`` to its agent's file. Waiting for the file lock lets go of the store, so the state
        is read only once the lock is held. With ``current`` (a resident agent written back by flush or
        eviction): skipped if meanwhile the agent's context was replaced or written, else marked on disk.
        If ``adopt()`` (save, put) says so once the file holds ``handle``, a share of it becomes the agent's
        resident context at once, marked on disk only when the directory sync made the file durable: after a
        failed sync or an interrupt memory agrees with the disk, and the context is written again later."""
        written = current

        def replaced() -> None:
            nonlocal written
            if adopt():
                written = self._set_resident(handle.agent_id, handle.share(), on_disk=False)

        def superseded() -> bool:
            return current is not None and (self._resident.get(handle.agent_id) is not current or current.on_disk)

        def write(fd: int) -> None:
            if superseded():
                raise _Superseded
            header = AgentCacheHeader(
                handle.agent_id, self.model_fingerprint, geometry_of(self.pool.spec), handle.token_ids,
                tuple(len(ids) for ids in handle.all_block_ids),
            )
            write_agent_cache(fd, header, self._gather(handle))

        if superseded():  # an earlier write-back of the same flush waited: this one need not take the lock
            return
        try:
            self._directory.replace(handle.agent_id, write, replaced)
        except _Superseded:
            return
        finally:
            self._file_changed(handle.agent_id)
        if written is not None:
            written.on_disk = True

    def _gather(self, handle: AgentBlocks) -> List["mx.array"]:
        """The stored parts (keys and values, or their packed forms) of every layer that holds blocks,
        in file order; one gather per block count."""
        layers_by_count: Dict[int, List[int]] = defaultdict(list)
        for layer, ids in enumerate(handle.all_block_ids):
            if ids:
                layers_by_count[len(ids)].append(layer)
        per_layer = {}
        for layers in layers_by_count.values():
            parts = self.pool.gather_stored([handle.layer_block_ids(layer) for layer in layers])
            for i, layer in enumerate(layers):
                per_layer[layer] = [part[i] for part in parts]
        return [tensor for layer in sorted(per_layer) for tensor in per_layer[layer]]

    def _read_into_pool(self, agent_id: str, keep: Optional[str] = None) -> AgentBlocks:
        """Check the whole file first, then allocate (making room) and write the blocks through the pool."""
        spec = self.pool.spec

        def fits_ever(header: AgentCacheHeader) -> None:  # checked before MLX allocates the tensors (it would crash)
            if (needed := sum(header.layer_blocks)) > self.pool.total_blocks:
                raise PoolExhaustedError(
                    needed, self.pool.total_blocks,
                    f"(agent {agent_id!r}'s context can never fit this pool of {self.pool.total_blocks} blocks; "
                    "load it into a larger pool)", ever=True,
                )

        with self._directory.open_for_reading(agent_id) as file:
            header, tensors = read_agent_cache(file, agent_id=agent_id, model_fingerprint=self.model_fingerprint,
                                               spec=spec, check_header=fits_ever)
        needed = sum(header.layer_blocks)
        if not self._make_room(needed, keep):
            raise PoolExhaustedError(
                needed, self.pool.available_blocks,
                f"(loading agent {agent_id!r}: the agents this store holds cannot free enough; "
                "release handles you hold, or use a larger pool)",
            )
        tensors_in_order = iter(tensors)
        n_parts = len(spec.stored_parts)
        with self.pool.build_handle(agent_id) as builder:
            layer_ids, plan = [], []
            for layer, n_blocks in enumerate(header.layer_blocks):
                ids = builder.allocate(n_blocks)
                layer_ids.append(ids)
                if n_blocks:
                    first = spec.layer_block_range(layer, len(header.token_ids))[0]
                    parts = [next(tensors_in_order)[None] for _ in range(n_parts)]
                    plan.append((ids, first, parts, first * spec.block_size))
            self.pool.write_stored(plan)
            return builder.finish(header.token_ids, layer_ids)


class _Superseded(Exception):
    """A write-back found, once it held the file lock, that its context is no longer the one to write."""


def _write_failures(failures: List[Tuple[str, CachePersistenceError]], what: str) -> CachePersistenceError:
    """One error for the agents whose files could not be written (they stay in the pool, nothing lost): the
    agent's own error if there is one, else a ``CacheWriteError`` naming each."""
    if len(failures) == 1:
        return failures[0][1]
    return CacheWriteError(f"{what}: {len(failures)} agents could not be written and stay in the pool "
                           f"({_reasons(failures)}); fix the cause and try again")


def _reasons(failures: List[Tuple[str, CachePersistenceError]]) -> str:
    return "; ".join(f"{agent_id!r}: {exc}" for agent_id, exc in failures)
