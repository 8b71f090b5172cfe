"""BlockPool bookkeeping: property tests against a simple model, misuse, threads, geometry."""

import collections
import contextlib
import copy
import dataclasses
import gc
import threading

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from semantic.domain.errors import (
    BlockOwnershipError,
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
    ReleasedHandleError,
    SemanticError,
)
from semantic.domain import services
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import PRESETS, ModelCacheSpec

SPEC = ModelCacheSpec(n_layers=2, n_kv_heads=1, k_head_dim=4, v_head_dim=4, dtype="float32", name="tiny")
AGENTS = ("a", "b", "c")
# Not a count of blocks: negative, huge, fractional, textual, boolean, missing, array-valued.
BAD_COUNTS = (-3, -1, 1.5, float("nan"), "3", None, True, False, np.int64(-2), np.bool_(True), [1], 2**70)
# Not a block id of a 12-block pool.
BAD_IDS = (-1, 12, 2**40, 2**70, True, np.bool_(False), 1.0, "1", None, (1,), np.float32(2))
BAD_AGENTS = ("", None, 5, b"a", ["a"], True)


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / retain / release / handle / share / reserve sequences against a model:
    ``refs[agent]`` counts the references each agent holds on each block."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(SPEC, total_blocks=12)
        self.refs = {a: collections.Counter() for a in AGENTS}
        self.handles = []
        self.reservations = []

    def _model_refcount(self):
        total = collections.Counter()
        for counter in self.refs.values():
            total.update(counter)
        for handle in self.handles:
            total.update(b for ids in handle.all_block_ids for b in ids)
        return total

    @rule(agent=st.sampled_from(AGENTS), n=st.integers(0, 6))
    def allocate(self, agent, n):
        free = self.pool.total_blocks - len(self._model_refcount()) - sum(r.remaining for r in self.reservations)
        before = self.pool.usage()
        if n > free:
            with pytest.raises(PoolExhaustedError) as info:
                self.pool.allocate(n, agent)
            assert (info.value.requested, info.value.available) == (n, free)
            assert self.pool.usage() == before
        else:
            ids = self.pool.allocate(n, agent)
            assert len(set(ids)) == n and not set(ids) & set(self._model_refcount())
            self.refs[agent].update(ids)

    @rule(agent=st.sampled_from(AGENTS), data=st.data())
    def retain_or_release_raw(self, agent, data):
        held = sorted(self._model_refcount())
        if not held:
            return
        block = data.draw(st.sampled_from(held))
        if data.draw(st.booleans()):
            self.pool.retain([block], agent)
            self.refs[agent][block] += 1
        elif self.refs[agent][block]:
            self.pool.release_blocks([block], agent)
            self.refs[agent][block] -= 1
            self.refs[agent] += collections.Counter()
        else:
            before = self.pool.usage()
            with pytest.raises(BlockOwnershipError):
                self.pool.release_blocks([block], agent)
            assert self.pool.usage() == before

    @rule(agent=st.sampled_from(AGENTS))
    def wrap_raw_blocks_in_a_handle(self, agent):
        ids = sorted(set(self.refs[agent].elements()))  # a handle lists each of its blocks once
        if not ids:
            return
        with self.pool.build_handle(agent) as builder:
            builder.retain(ids)
            handle = builder.finish([1, 2, 3], [ids, []])
        self.handles.append(handle)

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), agent=st.sampled_from(AGENTS))
    def share_handle(self, data, agent):
        handle = data.draw(st.sampled_from(self.handles))
        self.handles.append(handle.share(agent))

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), drop=st.booleans())
    def release_handle(self, data, drop):
        handle = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        if drop:  # the finalizer gives the blocks back at the next pool call
            del handle
            gc.collect()
        else:
            handle.release()
            before = self.pool.usage()
            with pytest.raises(ReleasedHandleError):
                handle.release()
            assert self.pool.usage() == before

    @rule(n=st.integers(0, 5))
    def reserve(self, n):
        free = self.pool.total_blocks - len(self._model_refcount()) - sum(r.remaining for r in self.reservations)
        if n > free:
            with pytest.raises(PoolExhaustedError):
                self.pool.reserve(n, "r")
        else:
            self.reservations.append(self.pool.reserve(n, "r"))

    @precondition(lambda self: self.reservations)
    @rule(agent=st.sampled_from(AGENTS), data=st.data())
    def allocate_from_reservation(self, agent, data):
        reservation = self.reservations[-1]
        n = data.draw(st.integers(0, reservation.remaining))
        self.refs[agent].update(self.pool.allocate(n, agent, reservation=reservation))
        if data.draw(st.booleans()):
            reservation.cancel()
            self.reservations.pop()

    @rule(data=st.data())
    def misuse_changes_nothing(self, data):
        """Any public call with a bad argument raises a typed error and leaves the pool as it was."""
        handle = data.draw(st.sampled_from(self.handles)) if self.handles else None
        bad_count = data.draw(st.sampled_from(BAD_COUNTS))
        bad_id = data.draw(st.sampled_from(BAD_IDS))
        bad_agent = data.draw(st.sampled_from(BAD_AGENTS))
        good_ids = sorted(self._model_refcount())
        calls = {
            "allocate": lambda: self.pool.allocate(bad_count, "a"),
            "allocate huge": lambda: self.pool.allocate(2**62, "a"),
            "allocate agent": lambda: self.pool.allocate(1, bad_agent),
            "allocate reservation": lambda: self.pool.allocate(1, "a", reservation="r"),
            "reserve": lambda: self.pool.reserve(bad_count, "r"),
            "reserve huge": lambda: self.pool.reserve(2**62, "r"),
            "reserve owner": lambda: self.pool.reserve(1, None),
            "retain id": lambda: self.pool.retain(good_ids[:1] + [bad_id], "a"),
            "retain not a list": lambda: self.pool.retain(data.draw(st.sampled_from([3, "01", None, iter(good_ids)])), "a"),
            "retain agent": lambda: self.pool.retain(good_ids[:1], bad_agent),
            "release id": lambda: self.pool.release_blocks([bad_id], "a"),
            "release not a list": lambda: self.pool.release_blocks(data.draw(st.sampled_from([0, "0", None])), "a"),
            "release agent": lambda: self.pool.release_blocks(good_ids[:1], bad_agent),
            "refcount": lambda: self.pool.refcount(bad_id),
            "block_keys": lambda: self.pool.block_keys(bad_id),
            "gather": lambda: self.pool.gather([[bad_id]]),
            "gather ragged": lambda: self.pool.gather([[0, 1], [0]]),
            "write_blocks": lambda: self.pool.write_blocks([bad_id], 0, np.zeros((1, 1, 1, 4)), np.zeros((1, 1, 1, 4)), 0),
            "build_handle agent": lambda: self.pool.build_handle(bad_agent),
            "build_handle reservation": lambda: self.pool.build_handle("a", reservation=5),
            "share agent": lambda: handle.share(bad_agent or "") if handle else self.pool.share(None),  # None: same agent
            "release not a handle": lambda: self.pool.release(data.draw(st.sampled_from([None, "h", 3]))),
            "builder": lambda: self._misuse_builder(data, bad_id),
        }
        name = data.draw(st.sampled_from(sorted(calls)))
        before = self.pool.usage()
        with pytest.raises(SemanticError):
            calls[name]()
        assert self.pool.usage() == before, name

    def _misuse_builder(self, data, bad_id):
        """A builder finished with references it did not take, or with malformed tokens / layers."""
        with self.pool.build_handle("a") as builder:
            ids = builder.allocate(1) if self.pool.available_blocks else []
            builder.finish(*data.draw(st.sampled_from([
                ([1], [ids + [bad_id], []]),
                ([1], [ids]),
                ([True], [ids, []]),
                ([-1], [ids, []]),
                ("ab", [ids, []]),
                ([1], "ab"),
                ([1], [ids, [], []]),
            ])))

    @invariant()
    def matches_model(self):
        self.pool.check_invariants()
        expected = self._model_refcount()
        usage = self.pool.usage()
        assert usage.used_blocks == len(expected)
        assert usage.free_blocks + usage.used_blocks == usage.total_blocks
        assert usage.reserved_blocks == sum(r.remaining for r in self.reservations)
        for block, count in expected.items():
            assert self.pool.refcount(block) == count >= 1

    def teardown(self):
        for handle in self.handles:
            handle.release()
        for agent, counter in self.refs.items():
            self.pool.release_blocks(list(counter.elements()), agent)
        for reservation in self.reservations:
            reservation.cancel()
        usage = self.pool.usage()
        assert usage.used_blocks == usage.reserved_blocks == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_per_agent_attribution_in_blocks_and_bytes():
    pool = BlockPool(SPEC, total_blocks=10)
    a = pool.allocate(3, "a")
    pool.retain(a[:1], "b")
    usage = pool.usage()
    assert usage.per_agent == {"a": (3, 3 * SPEC.bytes_per_block_per_layer), "b": (1, SPEC.bytes_per_block_per_layer)}
    assert usage.used_blocks == 3 and usage.used_bytes == 3 * SPEC.bytes_per_block_per_layer
    assert pool.nbytes == 10 * SPEC.bytes_per_block_per_layer  # the arrays the pool holds


def test_misuse_raises_typed_errors_and_changes_nothing():
    pool = BlockPool(SPEC, total_blocks=6)
    other = BlockPool(SPEC, total_blocks=6)
    ids = pool.allocate(2, "a")
    with pool.build_handle("a") as b:
        b.retain(ids)
        handle = b.finish([1], [ids, []])
    foreign_ids = other.allocate(1, "a")
    with other.build_handle("a") as b:
        b.retain(foreign_ids)
        foreign = b.finish([1], [foreign_ids, []])
    reservation = pool.reserve(1, "x")
    before = pool.usage()
    for error, call in [
        (BlockOwnershipError, lambda: pool.release_blocks([5], "a")),  # free block
        (BlockOwnershipError, lambda: pool.release_blocks([99], "a")),  # not in this pool
        (BlockOwnershipError, lambda: pool.release_blocks(ids, "b")),  # held by another agent
        (BlockOwnershipError, lambda: pool.release_blocks([ids[0]] * 3, "a")),  # more than held
        (BlockOwnershipError, lambda: pool.retain([4], "a")),  # free blocks cannot be shared
        (InvalidRequestError, lambda: pool.allocate(-1, "a")),
        (InvalidRequestError, lambda: pool.allocate(1, "")),
        (PoolExhaustedError, lambda: pool.allocate(7, "a")),
        (IncompatibleCacheError, lambda: pool.release(foreign)),
        (IncompatibleCacheError, lambda: pool.share(foreign)),
        (IncompatibleCacheError, lambda: pool.pin(foreign)),
        # Row indexes are read unchecked by the kernels: one of a larger pool read past the arrays (a crash).
        (InvalidRequestError, lambda: pool.gather(rows=BlockPool(SPEC, total_blocks=4096).gather_rows([[4000]]))),
        (InvalidRequestError, lambda: pool.gather_apart(other.gather_rows([foreign_ids]))),
        (InvalidRequestError, lambda: pool.gather(rows=mx.array([[[0]]]))),
        # Made by hand, or a real one edited: the kernels read past the arrays (a segmentation fault).
        (InvalidRequestError, lambda: pool.gather(rows=services.GatherRows(mx.array([[[10**8]]], mx.int32),
                                                                          pool.pool_id))),
        (InvalidRequestError, lambda: pool.gather_apart(rows=dataclasses.replace(
            pool.gather_rows([ids, []][:1] * 2), index=mx.array([[[10**8]], [[10**8]]], mx.int32)))),
        # A reservation the pool never made promised blocks it never set aside: later allocations failed.
        (InvalidRequestError, lambda: pool.allocate(2, "a", reservation=services.Reservation(pool, 2, "x"))),
        (AttributeError, lambda: setattr(reservation, "remaining", 50)),
        # A NaN timeout was never reached: the wait hung.
        (InvalidRequestError, lambda: pool.wait_for_blocks(100, float("nan"))),
        (InvalidRequestError, lambda: pool.wait_for_blocks(100, 10**400)),
        (InvalidRequestError, lambda: pool.wait_for_blocks("1", 0.01)),
        (InvalidRequestError, lambda: pool.wait_for_blocks(100, 0.01, stop=5)),
        # Writes of another shape: IndexError, ValueError, TypeError from inside the pool before.
        (InvalidRequestError, lambda: pool.write_stored(5)),
        (IncompatibleCacheError, lambda: pool.write_stored([(ids, 0, [mx.zeros((1, 1, 8, 4))], 0)])),
        (InvalidRequestError, lambda: pool.write_stored([(ids, 0, [])])),
        (InvalidRequestError, lambda: pool.write_stored([(ids, 0, None, 0)])),
        (InvalidRequestError, lambda: pool.write_many(5)),
        (InvalidRequestError, lambda: handle.layer_block_ids(2)),  # IndexError before
        (InvalidRequestError, lambda: handle.layer_block_ids(-1)),  # the last layer before
        (InvalidRequestError, lambda: pool.block_views(ids, 0.5, 3)),
        (InvalidRequestError, lambda: pool.block_views(ids, 0, None)),
    ]:
        with pytest.raises(error):
            call()
        assert pool.usage() == before
        pool.check_invariants()
    assert reservation.remaining == 1
    reservation.cancel()
    handle.release()
    pool.release_blocks(ids, "a")
    assert pool.usage().used_blocks == 0


def test_a_pin_holds_its_blocks_for_the_agent_until_it_is_dropped_and_copies_are_the_pin():
    pool = BlockPool(SPEC, total_blocks=6)
    with pool.build_handle("a") as b:
        ids = b.allocate(2)
        handle = b.finish([1], [ids[:1], ids[1:]])
    pin = pool.pin(handle)
    assert copy.copy(pin) is pin and copy.deepcopy([pin])[0] is pin
    handle.release()
    assert [pool.refcount(b) for b in ids] == [1, 1]
    assert pool.usage().per_agent == {"a": (2, 2 * SPEC.bytes_per_block_per_layer)}
    pool.check_invariants()
    with pytest.raises(ReleasedHandleError):
        pool.pin(handle)
    del pin  # no gc.collect(): reference counting gives the blocks back
    assert pool.usage().used_blocks == 0 and pool.usage().per_agent == {}
    pool.check_invariants()


def test_a_builders_references_are_its_own_until_finish():
    """release_blocks gives back an agent's raw references only: not those a builder took for its handle."""
    pool = BlockPool(SPEC, total_blocks=6)
    raw = pool.allocate(1, "a")
    with pool.build_handle("a") as b:
        ids = b.allocate(2)
        b.retain(raw)
        assert pool.usage().per_agent["a"] == (3, 3 * SPEC.bytes_per_block_per_layer)
        pool.check_invariants()
        before = pool.usage()
        with pytest.raises(BlockOwnershipError):
            pool.release_blocks(ids, "a")
        assert pool.usage() == before
        handle = b.finish([1], [ids, raw])
    pool.check_invariants()
    pool.release_blocks(raw, "a")  # the agent's own reference, not the handle's
    assert pool.refcount(raw[0]) == 1
    with pytest.raises(BlockOwnershipError):
        pool.release_blocks(raw, "a")
    handle.release()
    assert pool.usage().used_blocks == 0 and pool.usage().per_agent == {}


def test_a_handle_listing_a_block_twice_is_refused_and_its_references_given_back():
    """Listed twice, a block would make the handle's rebuild larger than the pool (listed 30,000 times in a
    small pool, more than MLX could allocate: a crash, not an error)."""
    pool = BlockPool(SPEC, total_blocks=6)
    before = pool.usage()
    with pytest.raises(BlockOwnershipError, match="block .* is listed 2 times"):
        with pool.build_handle("a") as builder:
            (block,) = builder.allocate(1)
            builder.retain([block])
            builder.finish([1] * SPEC.block_size, [[block], [block]])
    assert pool.usage() == before
    pool.check_invariants()


@pytest.mark.parametrize("block_format", ["dense", "q8"])
def test_a_gather_larger_than_mlx_may_allocate_is_refused_before_it_allocates(block_format):
    """MLX crashes, rather than raising, when it cannot get the memory: a gather listing blocks enough times
    to outgrow what it may allocate is an error first, whether dense or stored (quantized)."""
    spec = dataclasses.replace(PRESETS["smollm2-135m"], n_layers=1, layer_windows=(None,))
    spec = spec.with_format(block_format)
    pool = BlockPool(spec, total_blocks=2)
    (block,) = pool.allocate(1, "a")
    before = pool.usage()
    listed = np.full((1, mx.get_memory_limit() // spec.bytes_per_block_per_layer + 1), block, np.int32)
    for gather in (pool.gather, pool.gather_stored, pool.gather_rows):
        with pytest.raises(InvalidRequestError, match="more than MLX may still allocate"):
            gather(listed)
    assert pool.usage() == before
    assert pool.gather([[block]])[0].shape == (1, spec.n_kv_heads, spec.block_size, spec.k_head_dim)


def test_lazy_keys_of_another_thread_are_refused_and_change_nothing():
    """MLX streams belong to the thread that made them: a write of arrays another thread built but never
    evaluated is a typed error (MLX's bare RuntimeError before), the block's data as it was."""
    pool = BlockPool(SPEC, total_blocks=4)
    (block,) = pool.allocate(1, "a")
    shape = (1, SPEC.n_kv_heads, SPEC.block_size, SPEC.k_head_dim)
    pool.write_blocks([block], 0, mx.ones(shape), mx.ones(shape), 0)
    sources = {}
    thread = threading.Thread(target=lambda: sources.update(keys=mx.ones(shape) * 2, values=mx.ones(shape) * 3))
    thread.start()
    thread.join()
    before = pool.usage()
    with pytest.raises(InvalidRequestError, match="another thread's stream"):
        pool.write_blocks([block], 0, sources["keys"], sources["values"], 0)
    assert pool.usage() == before
    assert all(bool(mx.all(array == 1)) for array in pool.gather([[block], [block]]))


def test_a_builder_dropped_unfinished_gives_its_references_back():
    pool = BlockPool(SPEC, total_blocks=6)
    held = pool.allocate(1, "a")
    builder = pool.build_handle("a")
    builder.allocate(2)
    builder.retain(held)
    del builder
    gc.collect()
    assert pool.usage().used_blocks == 1 and pool.refcount(held[0]) == 1
    pool.check_invariants()


def test_finish_converts_lists_that_are_not_plain_ints():
    pool = BlockPool(SPEC, total_blocks=6)
    with pool.build_handle("a") as b:
        ids = b.allocate(3)
        handle = b.finish(np.array([5, 6]), [np.array(ids[:2]), range(ids[2], ids[2] + 1)])
    assert handle.token_ids == (5, 6) and handle.all_block_ids == (tuple(ids[:2]), (ids[2],))
    assert {type(v) for v in handle.token_ids + handle.all_block_ids[0] + handle.all_block_ids[1]} == {int}
    pool.check_invariants()
    handle.release()
    assert pool.usage().used_blocks == 0


@pytest.mark.parametrize("tokens,layers", [([1, None], None), ([1], [[None], []]), ([1], [[0, None], []])])
def test_a_none_among_the_ids_is_a_typed_error(tokens, layers):
    """The first bad item was looked up as ``next(..., None)``: a None item read as "none bad", then int(None)."""
    pool = BlockPool(SPEC, total_blocks=6)
    with pytest.raises(InvalidRequestError, match="None"):
        with pool.build_handle("a") as b:
            b.finish(tokens, layers or [b.allocate(1), []])
    assert pool.usage().used_blocks == 0


@pytest.mark.parametrize("total", [True, False, 0, -3, 1.5, "8", None, 2**70 * 1.0])
def test_a_pool_of_a_bad_size_is_refused(total):
    with pytest.raises(InvalidRequestError):
        BlockPool(SPEC, total)


def test_a_negative_reservation_is_refused_and_cannot_lose_blocks():
    pool = BlockPool(SPEC, total_blocks=4)
    with pytest.raises(InvalidRequestError):
        pool.reserve(-3, "x")
    pool.check_invariants()
    assert pool.allocate(4, "a") and pool.free_blocks == 0


def test_allocation_is_all_or_nothing():
    pool = BlockPool(SPEC, total_blocks=5)
    pool.allocate(3, "a")
    with pytest.raises(PoolExhaustedError) as info:
        pool.allocate(3, "b")
    assert "3 blocks requested, 2 free" in str(info.value)
    assert pool.free_blocks == 2 and "b" not in pool.usage().per_agent


def _runs(ids) -> list:
    """``(start, length)`` of each run of consecutive ids in ``ids``, in their order (the test's own model,
    not the pool's helper)."""
    runs = []
    for b in ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def test_under_agents_coming_and_going_an_allocation_is_the_best_fitting_run_of_free_ids():
    """A store's blocks are one run of consecutive ids whenever the free blocks hold one that long (the CUDA
    store then needs no plan array; other backends write a run as one slice). A free list used as a stack
    gave one run to about a fifth of such allocations. Checked against a model of the free ids after every
    step of a seeded churn: one run whenever one fits, from the start of a shortest run that fits, else
    whole runs, longest first, and the first ids of the next."""
    rng = np.random.default_rng(7)
    pool = BlockPool(SPEC, total_blocks=600)
    free, held = set(range(600)), []
    for _ in range(1500):
        if held and (rng.random() < 0.5 or len(free) < 150):
            ids = held.pop(rng.integers(len(held)))
            pool.release_blocks(ids, "a")
            free.update(ids)
        else:
            n = int(rng.choice([1, 3, 12, 40, 96]))
            if n > len(free):
                continue
            runs = dict(_runs(sorted(free)))  # start -> length of the free runs
            ids = pool.allocate(n, "a")
            taken = _runs(ids)  # the pieces, in the order handed out
            assert all(start in runs for start, _ in taken), "a piece that does not begin a free run"
            if max(runs.values()) >= n:
                assert len(taken) == 1 and runs[ids[0]] == min(length for length in runs.values() if length >= n)
            else:
                used = sorted((runs[start] for start, _ in taken), reverse=True)
                assert used == sorted(runs.values(), reverse=True)[: len(taken)]
                assert all(length == runs[start] for start, length in taken[:-1]), "a run not taken whole"
            free.difference_update(ids)
            held.append(ids)
        pool.check_invariants()
        assert pool.free_blocks == len(free)


def test_a_builder_claims_one_run_of_ids_only_when_its_blocks_are_one():
    """A CUDA store whose builder took its blocks as one run of ids writes them by their first id without
    comparing them: a claim for ids that are not one run would write blocks into other agents' ids."""
    pool = BlockPool(SPEC, total_blocks=40)
    with pool.build_handle("a") as builder:
        assert builder.allocate(5) == list(range(5)) and builder._one_run
        assert builder.allocate(2) == [5, 6] and not builder._one_run, "a second allocation: two pieces"
    singles = [pool.allocate(1, "a") for _ in range(40)]
    for ids in singles[::2]:
        pool.release_blocks(ids, "a")  # free: 0, 2, 4, ...: no two consecutive
    with pool.build_handle("b") as builder:
        assert len(_runs(builder.allocate(3))) == 3 and not builder._one_run
    pool.release_blocks(singles[1], "a")  # 0, 1, 2 free: one run of three
    with pool.build_handle("b") as builder:
        assert builder.allocate(3) == [0, 1, 2] and builder._one_run
    pool.check_invariants()
    assert type(pool.allocate(2, "c")) is list  # the public call hands out a list, whatever the pool holds


def test_blocks_given_back_merge_with_their_free_neighbours():
    pool = BlockPool(SPEC, total_blocks=30)
    a, b, c = (pool.allocate(10, agent) for agent in AGENTS)
    pool.release_blocks(a, "a")
    pool.release_blocks(c, "c")
    pool.release_blocks(b, "b")
    pool.check_invariants()
    assert pool.allocate(30, "a") == list(range(30))


def test_threads_allocating_and_releasing_keep_the_invariants():
    pool = BlockPool(SPEC, total_blocks=64)
    errors = []

    def worker(agent):
        try:
            for i in range(300):
                try:
                    ids = pool.allocate(1 + i % 4, agent)
                except PoolExhaustedError:
                    continue
                with pool.build_handle(agent) as b:
                    b.retain(ids)
                    handle = b.finish([i], [ids, []])
                shared = handle.share("shared-" + agent)
                pool.release_blocks(ids, agent)
                handle.release()
                if i % 2:
                    shared.release()
                else:
                    del shared  # finalizer path, racing with the other threads
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert not errors
    pool.check_invariants()
    assert pool.usage().used_blocks == 0


def test_spec_presets_and_derived_sizes():
    smol = PRESETS["smollm2-135m"]
    assert (smol.n_layers, smol.n_kv_heads, smol.head_dim) == (30, 3, 64)
    assert smol.bytes_per_block_per_layer == 2 * 3 * 64 * 256 * 2
    gemma = ModelCacheSpec.preset("gemma-3-12b")
    assert (gemma.n_layers, gemma.n_kv_heads, gemma.head_dim) == (48, 8, 256)
    assert len(gemma.sliding_window_layers) == 40 and gemma.full_attention_layers[:2] == (5, 11)
    assert gemma.blocks_per_agent(8192) == 8 * 32 + 40 * 4  # a 1024 window on block boundaries
    assert gemma.blocks_per_agent(8000) == 8 * 32 + 40 * 5  # ... and straddling them
    assert ModelCacheSpec.preset("llama-3.1-8b").n_layers == 32
    assert ModelCacheSpec.preset("qwen2.5-0.5b").n_kv_heads == 2
    assert gemma.with_layers(12).layer_windows == gemma.layer_windows[:12]
    with pytest.raises(InvalidRequestError, match="known presets"):
        ModelCacheSpec.preset("gpt-5")
    with pytest.raises(InvalidRequestError):
        ModelCacheSpec(n_layers=0, n_kv_heads=1, k_head_dim=1, v_head_dim=1)
    with pytest.raises(InvalidRequestError):
        ModelCacheSpec(2, 1, 4, 4, layer_windows=(None,))
    with pytest.raises(InvalidRequestError):
        ModelCacheSpec(2, 1, 4, 4, dtype="int8")
    # A dtype of a list, windows of None or an int, a preset named by a list: bare TypeErrors before; a
    # block of 2**31 tokens passed, then MLX's zeros raised OverflowError (its dimensions are 32-bit).
    for bad in (dict(n_layers=True), dict(n_kv_heads=True), dict(layer_windows=(True, None)), dict(dtype=["float16"]),
                dict(layer_windows=None), dict(layer_windows=5), dict(block_size=2**31), dict(k_head_dim=2**32 - 1),
                dict(layer_windows={None, 8})):
        with pytest.raises(InvalidRequestError):
            ModelCacheSpec(**{**dict(n_layers=2, n_kv_heads=1, k_head_dim=4, v_head_dim=4), **bad})
    assert ModelCacheSpec(2, 1, 4, 4, layer_windows=(w for w in (None, 8))).layer_windows == (None, 8)
    with pytest.raises(InvalidRequestError, match="known presets"):
        ModelCacheSpec.preset(["gpt-5"])
    for n_layers in (0, 2.5, True, "2"):
        with pytest.raises(InvalidRequestError, match="n_layers"):
            gemma.with_layers(n_layers)
    for n_tokens in ("8192", 8192.0, None, -1):  # a str, a float or None raised a bare TypeError
        with pytest.raises(InvalidRequestError, match="n_tokens"):
            gemma.blocks_per_agent(n_tokens)
    assert gemma.blocks_per_agent(np.int64(8192)) == gemma.blocks_per_agent(8192) and gemma.bytes_per_agent(0) == 0
    # 2**31 layers: a 17 GB tuple of windows built, then refused (or MemoryError); a format name of 5,000
    # digits and a NumPy array as format: bare ValueErrors.
    for build in (lambda: ModelCacheSpec(2**31 - 1, 1, 4, 4), lambda: SPEC.with_layers(2**31),
                  lambda: SPEC.with_layers(2**16 + 1), lambda: SPEC.with_format("q" + "9" * 5000),
                  lambda: SPEC.with_format(np.array([8, 4])), lambda: SPEC.with_format("q\u0668"),
                  lambda: SPEC.with_format("q4\n")):
        with pytest.raises(InvalidRequestError):
            build()
    assert SPEC.with_layers(2**16).n_layers == 2**16


# ---- what only the pool can check: sizes, who may be written, reservations after a failure ----------------
def test_a_pool_larger_than_mlx_may_allocate_is_refused_before_allocating():
    """MLX crashed the process (SIGSEGV) on a pool it could not allocate; it must be a typed error."""
    huge_heads = ModelCacheSpec(n_layers=2, n_kv_heads=2**20, k_head_dim=2**20, v_head_dim=2**20, dtype="float32",
                                name="huge")
    for spec, blocks in ((ModelCacheSpec.preset("llama-3.1-8b"), 1_000_000), (huge_heads, 1), (SPEC, 2**70)):
        with pytest.raises(InvalidRequestError, match="mx.get_memory_limit"):
            BlockPool(spec, total_blocks=blocks)
    limit = mx.get_memory_limit() // SPEC.bytes_per_block_per_layer
    with pytest.raises(InvalidRequestError, match=f"at most {limit} blocks"):
        BlockPool(SPEC, total_blocks=limit + 1)
    # Within memory, but more rows of one head than MLX's 32-bit dimensions count (OverflowError before).
    one_token = ModelCacheSpec(n_layers=1, n_kv_heads=2, k_head_dim=1, v_head_dim=1, dtype="float16", block_size=1)
    with pytest.raises(InvalidRequestError, match=f"at most {(2**31 - 1) // 2} blocks"):
        BlockPool(one_token, total_blocks=2**30)


def written(pool, block):
    keys, values = pool.gather([[block]])
    return np.array(keys), np.array(values)


def test_only_a_block_held_once_is_written():
    """A block with several references is shared, so immutable; a free one belongs to nobody."""
    pool = BlockPool(SPEC, total_blocks=6)
    fresh, shared = pool.allocate(2, "a")
    pool.retain([shared], "b")
    data = mx.ones((1, 1, 8, 4), dtype=mx.float32)
    pool.write_blocks([fresh], 0, data, data, 0)
    before = {b: written(pool, b) for b in range(6)}
    usage = pool.usage()
    for block in (shared, 5):  # held twice; free
        with pytest.raises(BlockOwnershipError, match="shared" if block == shared else "free"):
            pool.write_blocks([block], 0, data * 2, data * 2, 0)
        with pytest.raises(BlockOwnershipError):
            pool.write_many([([fresh], 0, data * 3, data * 3, 0), ([block], 0, data * 3, data * 3, 0)])
    after = {b: written(pool, b) for b in range(6)}
    assert all(np.array_equal(before[b][k], after[b][k]) for b in range(6) for k in (0, 1))
    assert pool.usage() == usage
    pool.check_invariants()


@pytest.mark.parametrize("block_format", ["dense", "q8g32"])
def test_a_handles_blocks_and_a_rebuilt_caches_are_never_written_even_held_once(block_format):
    """Held once by a live handle (or, the handle released, by the cache rebuilt from it), a block passed the
    write check, which looked only at its reference count: its context changed under the handle."""
    from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
    from semantic.benchmarking.cases import random_caches

    spec = ModelCacheSpec(1, 1, 32, 32, "float32", block_size=4).with_format(block_format)
    pool = BlockPool(spec, total_blocks=4, grow_buffer_cache=False)
    handle = cache_to_blocks(pool, "alice", random_caches(spec, 4, seed=1), [1, 2, 3, 4])
    (block,) = handle.layer_block_ids(0)
    junk = mx.full((1, 1, 4, 32), 42.0)
    if block_format == "dense":
        write = lambda: pool.write_blocks([block], 0, junk, junk, 0)  # noqa: E731
    else:
        write = lambda: pool.write_stored([([block], 0, list(mx.quantize(junk, group_size=32, bits=8)) * 2, 0)])  # noqa: E731,E501
    kept = np.array(blocks_to_cache(pool, handle, views=False)[0].keys)
    usage = pool.usage()
    assert pool.refcount(block) == 1  # the handle's reference alone
    with pytest.raises(BlockOwnershipError, match="held by a handle, or by a cache rebuilt from one"):
        write()
    assert np.array_equal(np.array(blocks_to_cache(pool, handle, views=False)[0].keys), kept)
    assert pool.usage() == usage
    if block_format == "dense":  # a dense rebuild views the pool's blocks: its pin is their one reference then
        cache = blocks_to_cache(pool, handle)
        handle.release()
        assert pool.refcount(block) == 1
        with pytest.raises(BlockOwnershipError, match="held by a handle, or by a cache rebuilt from one"):
            write()
        assert np.array_equal(np.array(cache[0].keys), kept)
        del cache
    pool.check_invariants()
    (raw,) = pool.allocate(1, "b")  # a raw reference's block is written, as before
    pool.write_blocks([raw], 0, junk, junk, 0) if block_format == "dense" else pool.write_stored(
        [([raw], 0, list(mx.quantize(junk, group_size=32, bits=8)) * 2, 0)])
    pool.release_blocks([raw], "b")


def test_a_handle_made_by_hand_or_given_another_agent_is_refused():
    """A hand-made AgentBlocks over free blocks was shared and pinned (references on free blocks, which were then
    handed out again); a handle whose agent was changed released nothing (its blocks leaked)."""
    from semantic.application.block_cache import blocks_to_cache
    from semantic.domain.entities import AgentBlocks

    pool = BlockPool(SPEC, total_blocks=4)
    fake = AgentBlocks(pool, "mallory", [1] * 8, [[0], [1]])
    usage = pool.usage()
    for call in (lambda: pool.share(fake), lambda: pool.pin(fake), lambda: blocks_to_cache(pool, fake),
                 fake.release, lambda: pool.check_handle(fake)):
        with pytest.raises(InvalidRequestError, match="made by hand"):
            call()
        assert pool.usage() == usage
    with pool.build_handle("a") as builder:
        ids = builder.allocate(2)
        handle = builder.finish([1] * 8, [[ids[0]], [ids[1]]])
    for name in ("agent_id", "token_ids"):
        with pytest.raises(AttributeError):
            setattr(handle, name, "bob" if name == "agent_id" else (5,) * 8)
    handle.release()
    assert pool.free_blocks == 4
    pool.check_invariants()


def test_a_builder_dropped_unfinished_gives_its_reservations_blocks_back_to_the_reservation():
    """Its blocks went back to the pool but not to the reservation they came from: the owner's later allocation
    against the reservation (which cannot fail) failed once others took the free blocks."""
    pool = BlockPool(SPEC, total_blocks=6)
    reservation = pool.reserve(4, "req")
    builder = pool.build_handle("req", reservation)
    builder.allocate(3)
    del builder
    gc.collect()
    others = pool.allocate(pool.available_blocks, "other")
    assert len(others) == 2 and reservation.remaining == 4
    assert len(pool.allocate(4, "req", reservation=reservation)) == 4
    pool.check_invariants()


def test_a_builder_writes_exactly_the_blocks_it_allocated_in_order_or_nothing():
    """write_new and the store's own _write_store skip the pool's ownership checks because their blocks are the
    builder's own, just allocated: a write of other blocks (another agent's, in place of one of its own or
    beside them, only some of its own, or out of order) is refused."""
    pool = BlockPool(SPEC, total_blocks=6)
    other = pool.allocate(1, "b")
    data = mx.ones((1, 1, 8, 4), dtype=mx.float32)
    pool.write_blocks(other, 0, data, data, 0)
    before = {b: written(pool, b) for b in range(6)}
    usage = pool.usage()
    for pick in (lambda ids: other, lambda ids: [ids[0], *other], lambda ids: ids[:1], lambda ids: ids[::-1],
                 lambda ids: ids + other):
        with pool.build_handle("a") as builder:
            ids = builder.allocate(2)
            with pytest.raises(BlockOwnershipError):
                builder.write_new([([b], 0, data * 2, data * 2, 0) for b in pick(ids)])
            with pytest.raises(BlockOwnershipError):
                builder._write_store([([b], 0, data * 2, data * 2, 0, 8) for b in pick(ids)])
            with pytest.raises(BlockOwnershipError):
                builder._finish_store((1,), [ids[:1], []])  # fewer blocks than it holds
    after = {b: written(pool, b) for b in range(6)}
    assert all(np.array_equal(before[b][k], after[b][k]) for b in range(6) for k in (0, 1))
    assert pool.usage() == usage
    with pool.build_handle("a") as builder:
        ids = builder.allocate(2)
        builder.write_new([([b], 0, data * 3, data * 3, 0) for b in ids])
        handle = builder.finish((1,), [ids[:1], ids[1:]])
    assert all((written(pool, b)[0][..., :8, :] == 3).all() and (written(pool, b)[0][..., 8:, :] == 0).all() for b in ids)
    assert handle.all_block_ids == ((ids[0],), (ids[1],))
    pool.check_invariants()


def test_a_builder_takes_only_the_ids_it_allocated_as_ints_and_keeps_its_unchecked_store_path_private():
    """The store's fast path (_write_store, _finish_store: numbers from the pool's own arithmetic) was public as
    write_store / finish_store: a block listed twice ended at a reference count of -1, another agent's block
    went back on the free list while still in use, a negative first token raised a bare ValueError. The public
    builder checks what its caller gives: ids that are floats equal to its own passed write_new's comparison,
    then failed the write (TypeError)."""
    pool = BlockPool(SPEC, total_blocks=6)
    victim = pool.allocate(1, "victim")
    data = mx.ones((1, 1, 8, 4), dtype=mx.float32)
    usage = pool.usage()
    for name in ("write_store", "finish_store"):
        assert not hasattr(pool.build_handle("a"), name)
    for listing in (lambda x, y: [[x, x], []], lambda x, y: [[victim[0]], [y]], lambda x, y: [["x"], [y]],
                    lambda x, y: [[float(x)], [float(y)]], lambda x, y: [[x], [y, 5]]):
        with pool.build_handle("a") as builder:
            x, y = builder.allocate(2)
            with pytest.raises((BlockOwnershipError, InvalidRequestError)):
                builder.finish((1,), listing(x, y))
        pool.check_invariants()
        assert pool.usage() == usage
    for convert in (float, bool, str):
        with pool.build_handle("a") as builder:
            ids = builder.allocate(1)
            with pytest.raises(InvalidRequestError, match="block_ids"):
                builder.write_new([([convert(ids[0])], 0, data, data, 0)])
        pool.check_invariants()
        assert pool.usage() == usage
    with pool.build_handle("a") as builder:  # NumPy ints are the ints they are
        ids = builder.allocate(1)
        builder.write_new([([np.int64(ids[0])], 0, data * 2, data * 2, 0)])
        handle = builder.finish((1,), [ids, []])
    assert (written(pool, ids[0])[0][..., :8, :] == 2).all()
    handle.release()
    pool.check_invariants()


@pytest.mark.parametrize("ending", ["finished", "rolled back", "dropped"])
def test_a_queued_write_that_cannot_run_on_this_thread_ends_its_builder_cleanly(ending):
    """On CUDA a builder's write is only queued; its sources are evaluated when it is waited for. Sources that
    are lazy arrays of another thread's stream then raised MLX's bare RuntimeError from finish (and from a
    rollback, hiding the error that caused it and keeping the blocks while that error lived), and a builder
    dropped unfinished made every later pool operation raise it (the pool waits for a dropped builder's write
    before it takes its blocks back). Here the queued write is such an array."""
    pool = BlockPool(SPEC, total_blocks=6)
    lazy = []
    thread = threading.Thread(target=lambda: lazy.append(mx.ones((4,)) * 2))
    thread.start()
    thread.join()
    builder = pool.build_handle("a")
    ids = builder.allocate(2)
    builder._pending = builder._watch.pending = lazy[0]
    if ending == "finished":
        with pytest.raises(InvalidRequestError, match="another thread's stream"):
            with builder:
                builder.finish((1,), [ids[:1], ids[1:]])
    elif ending == "rolled back":
        with pytest.raises(KeyError, match="the caller's own error") as raised:
            with builder:
                raise KeyError("the caller's own error")
        assert pool.usage().used_blocks == 0  # while that error lives
        del raised
    del builder
    gc.collect()
    assert pool.usage().used_blocks == 0
    pool.check_invariants()
    assert len(pool.allocate(6, "b")) == 6


@pytest.mark.parametrize("ending", ["finished", "rolled back"])
def test_a_builder_waits_for_its_queued_write_before_its_blocks_leave_it(monkeypatch, ending):
    """On CUDA write_new only queues its kernel (the caller's Python runs while it copies): the handle, or a
    rollback giving the blocks back for another agent to write, must come after the copy. Here the write
    returns a lazy array as the CUDA path does, and the order of events is recorded."""
    pool = BlockPool(SPEC, total_blocks=4)
    events, queued = [], []
    real_write, real_eval = BlockPool._write_checked, mx.eval

    def queued_write(self, writes, ids, **kwargs):
        real_write(self, writes, ids, **kwargs)
        events.append("queued")
        queued.append(mx.zeros((1,), mx.uint8) + 1)
        return queued[-1]

    def recorded_eval(*arrays):
        if queued and arrays[0] is queued[-1]:
            events.append("waited")
        real_eval(*arrays)

    monkeypatch.setattr(BlockPool, "_write_checked", queued_write)
    monkeypatch.setattr(services.mx, "eval", recorded_eval)
    monkeypatch.setattr(BlockPool, "_drop", lambda self, *a, real=BlockPool._drop: (events.append("given back"),
                                                                                   real(self, *a))[1])
    monkeypatch.setattr(BlockPool, "_adopt", lambda self, *a, real=BlockPool._adopt: (events.append("handle"),
                                                                                     real(self, *a))[1])
    data = mx.ones((1, 1, 8, 4), dtype=mx.float32)
    with pytest.raises(InvalidRequestError) if ending == "rolled back" else contextlib.nullcontext():
        with pool.build_handle("a") as builder:
            ids = builder.allocate(2)
            builder.write_new([([b], 0, data, data, 0) for b in ids])
            if ending == "rolled back":
                raise InvalidRequestError("a bad token found while the device copies")
            builder.finish((1,), [ids[:1], ids[1:]]).release()
    assert events[:3] == ["queued", "waited", "handle" if ending == "finished" else "given back"]
    assert pool.usage().used_blocks == 0
    pool.check_invariants()


def test_a_block_named_twice_in_one_write_is_refused_and_nothing_is_written():
    """Each write fills whole blocks: the same block twice would be written by two threads at once on CUDA."""
    pool = BlockPool(SPEC, total_blocks=4)
    first, second = pool.allocate(2, "a")
    one, two = mx.ones((1, 1, 16, 4), dtype=mx.float32), mx.ones((1, 1, 300, 4), dtype=mx.float32)  # blocks' worth
    before = {b: written(pool, b) for b in range(4)}
    for writes in ([([first, first], 0, two, two, 0)],
                   [([first], 0, one, one, 0), ([second, first], 0, two, two, 0)]):
        with pytest.raises(BlockOwnershipError, match=f"block {first} is written twice"):
            pool.write_many(writes)
    assert all(np.array_equal(before[b][k], written(pool, b)[k]) for b in range(4) for k in (0, 1))
    pool.check_invariants()


@pytest.mark.parametrize("n_blocks,first_index,first_token,n_tokens", [
    (3, 0, 0, 10),  # more blocks than tokens: the last two would keep an earlier owner's data
    (1, 0, 0, 600),  # fewer: tokens 256.. would be dropped
    (1, 0, 1000, 10),  # tokens of block index 3 into block index 0
    (2, 1, 0, 200),  # no token in the blocks at all
    (1, 0, 0, 0),  # a block and no tokens
])
def test_a_write_whose_blocks_do_not_fit_its_tokens_is_refused_and_writes_nothing(n_blocks, first_index, first_token,
                                                                                   n_tokens):
    pool = BlockPool(SPEC, total_blocks=4)
    ids = pool.allocate(n_blocks, "a")
    before = {b: written(pool, b) for b in range(4)}
    data = mx.ones((1, 1, max(n_tokens, 1), 4), dtype=mx.float32)
    with pytest.raises(InvalidRequestError, match="do not fit"):
        pool.write_many([(ids, first_index, data, data, first_token, n_tokens)])
    assert all(np.array_equal(before[b][k], written(pool, b)[k]) for b in range(4) for k in (0, 1))
    pool.check_invariants()


@pytest.mark.parametrize("keys,values,extra", [
    (mx.ones((1, 1, 8, 4), dtype=mx.float16), None, ()),  # another dtype: stored as reinterpreted bits before
    (mx.ones((1, 1, 8, 4), dtype=mx.bfloat16), None, ()),
    (mx.ones((1, 2, 8, 4)), None, ()),  # heads
    (mx.ones((1, 1, 8, 5)), None, ()),  # head dim
    (mx.ones((2, 1, 8, 4)), None, ()),  # a batch
    (mx.ones((1, 8, 4)), None, ()),
    (mx.ones((1, 1, 8, 4)), mx.ones((1, 1, 7, 4)), ()),  # keys and values of different lengths
    (np.ones((1, 1, 8, 4), dtype=np.float32), None, ()),
    (mx.ones((1, 1, 8, 4)), None, (9,)),  # more tokens than the arrays hold
    (mx.ones((1, 1, 8, 4)), None, (-1,)),
])
def test_a_write_of_another_dtype_or_shape_is_refused_and_writes_nothing(keys, values, extra):
    pool = BlockPool(SPEC, total_blocks=4)
    (block,) = pool.allocate(1, "a")
    before = written(pool, block)
    with pytest.raises((IncompatibleCacheError, InvalidRequestError)):
        pool.write_many([([block], 0, keys, keys if values is None else values, 0, *extra)])
    assert all(np.array_equal(b, a) for b, a in zip(before, written(pool, block)))
    pool.check_invariants()


@pytest.mark.parametrize("cancelled", [False, True])
def test_a_failed_build_gives_back_what_it_drew_from_a_reservation_unless_that_was_cancelled(cancelled):
    pool = BlockPool(SPEC, total_blocks=8)
    reservation = pool.reserve(4, "me")
    with pytest.raises(InvalidRequestError):
        with pool.build_handle("me", reservation) as builder:
            ids = builder.allocate(3)
            if cancelled:
                reservation.cancel()  # the request was given up while its handle was being built
            builder.finish([-1], [ids, []])  # a bad token id: the build fails after allocating
    promised = 0 if cancelled else 4
    assert reservation.remaining == promised and pool.usage().reserved_blocks == promised
    assert pool.used_blocks == 0
    pool.check_invariants()
    if not cancelled:
        pool.allocate(4, "other")
        assert len(pool.allocate(4, "me", reservation=reservation)) == 4  # the promise still holds


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_host_copies_on_threads_finish_every_item_taken_before_returning_or_raising(monkeypatch, error):
    """Threads take a large store's layers in turn; the call returns (or raises the first error) only once
    no thread is still writing: the blocks of a failed store go back to the free list at once."""
    import time

    from semantic.adapters import mlx_kernels

    monkeypatch.setattr(mlx_kernels, "_HOST_COPY_THREADS", 3)
    destination = np.zeros((40, 1000), np.uint16)
    source = np.arange(40 * 1000, dtype=np.uint16).reshape(40, 1000)
    takers, started, finished = set(), [], []

    def copy(item):
        started.append(item)
        takers.add(threading.get_ident())
        time.sleep(0.005)  # a copy long enough for the other threads to wake up and take items
        if item == 7:
            raise error("item 7")
        np.copyto(destination[item], source[item])
        finished.append(item)

    mlx_kernels.split_host_copies(copy, range(6), 1 << 30)  # each item large enough
    assert sorted(finished) == list(range(6)) and len(takers) > 1
    np.testing.assert_array_equal(destination[:6], source[:6])
    started.clear(), finished.clear()
    with pytest.raises(error, match="item 7"):
        try:
            mlx_kernels.split_host_copies(copy, range(40), 1 << 30)
        finally:
            at_return = set(started), set(finished)
    time.sleep(0.05)  # a thread still copying after the call returned would show up now
    assert at_return[1] == at_return[0] - {7}  # every other item taken was copied when the call returned
    assert (set(started), set(finished)) == at_return  # and none was taken after
    assert len(started) < 40  # the threads stopped taking items once one failed


def test_an_interrupt_as_the_copy_threads_start_stops_them_before_the_call_returns(monkeypatch):
    """Ctrl-C right after a copy thread started: the call raises only once no thread copies any more (the
    store's blocks go back to the free list at once, and another store may take them)."""
    import os
    import signal
    import time

    from semantic.adapters import mlx_kernels

    monkeypatch.setattr(mlx_kernels, "_HOST_COPY_THREADS", 2)
    threads = mlx_kernels._copy_executor()

    class InterruptedOnSubmit:
        def submit(self, fn):
            future = threads.submit(fn)
            os.kill(os.getpid(), signal.SIGINT)  # handled by the main thread at its next check
            return future

    monkeypatch.setattr(mlx_kernels, "_copy_executor", InterruptedOnSubmit)
    copied, returned = [], []

    def copy(item):
        time.sleep(0.01)
        copied.append(bool(returned))

    # Python raises KeyboardInterrupt for SIGINT only where it was not ignored at its start, as it is for a
    # command a non-interactive shell started in the background (`cmd &`): a CI runner may start pytest so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                mlx_kernels.split_host_copies(copy, range(20), 1 << 30)
            finally:
                returned.append(True)
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(0.3)
    assert len(copied) < 20 and not any(copied)  # stopped, and nothing copied after the call returned


def test_host_copies_on_threads_work_in_a_forked_child(monkeypatch):
    """A child forked after the copy threads started has none of them: it starts threads of its own."""
    import multiprocessing

    from semantic.adapters import mlx_kernels

    monkeypatch.setattr(mlx_kernels, "_HOST_COPY_THREADS", 2)
    mlx_kernels.split_host_copies(_take_slowly, range(4), 1 << 30)  # the parent's threads
    child = multiprocessing.get_context("fork").Process(target=_copy_on_threads_and_exit)
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the child hung, or copied everything on its own thread"


_takers = set()


def _take_slowly(item):
    import time

    _takers.add(threading.get_ident())
    time.sleep(0.01)


def _copy_on_threads_and_exit():
    from semantic.adapters import mlx_kernels

    mlx_kernels._HOST_COPY_THREADS = 2
    _takers.clear()
    mlx_kernels.split_host_copies(_take_slowly, range(8), 1 << 30)
    raise SystemExit(0 if len(_takers) > 1 else 1)
