"""Ctrl-C anywhere in a pool operation: the pool stays consistent and loses nothing.

Each operation runs once per point where an interrupt could reach it (``interrupt_points``: a SIGINT sent as
each point of the pool's modules where CPython handles signals begins), and again with a second SIGINT 1, 3
and 8 points after the first (Ctrl-C pressed twice). After each run the test does what a caller does after
Ctrl-C (drops what it got, or repeats a release as the engine does), then checks that the pool's counts
agree with its holders, that exactly the blocks still held are used, that the blocks a survivor holds
still hold its data, and that every free block can be taken again."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from semantic.application import block_cache
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain import entities, free_runs, services
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec

from interrupt_points import at_every_point, traced

SPEC = ModelCacheSpec(n_layers=2, n_kv_heads=1, k_head_dim=4, v_head_dim=4, dtype="float32", name="tiny")
TRACED = {module.__file__ for module in (services, free_runs, entities, block_cache)}


def caches_of(n_tokens, seed):
    rng = np.random.default_rng(seed)
    caches = []
    for _ in range(SPEC.n_layers):
        cache = KVCache()
        keys, values = (mx.array(rng.standard_normal((1, 1, n_tokens, 4)).astype(np.float32)) for _ in range(2))
        cache.update_and_fetch(keys, values)
        caches.append(cache)
    mx.eval([(c.keys, c.values) for c in caches])
    return caches


def contents(pool, handle):
    return [(np.array(c.keys[:, :, : c.offset]), np.array(c.values[:, :, : c.offset]))
            for c in blocks_to_cache(pool, handle, views=False)]


class World:
    """A pool in which the agent "keep" holds a 600-token context (3 blocks a layer) that must survive
    whatever happens to the operation under test, plus what that operation works on."""

    def __init__(self):
        self.pool = BlockPool(SPEC, total_blocks=16, grow_buffer_cache=False)
        self.keep_tokens = list(range(600))
        self.keep = cache_to_blocks(self.pool, "keep", caches_of(600, 0), self.keep_tokens)
        self.keep_contents = contents(self.pool, self.keep)
        self.used_by_keep = self.pool.used_blocks

    def check_after(self, expected_used=None):
        """What must hold once the caller has dropped or finished what the interrupted operation left."""
        gc.collect()
        pool = self.pool
        pool.check_invariants()
        assert pool.reserved_blocks == 0
        assert pool.used_blocks == (self.used_by_keep if expected_used is None else expected_used)
        for (keys, values), (want_keys, want_values) in zip(contents(pool, self.keep), self.keep_contents):
            np.testing.assert_array_equal(keys, want_keys)
            np.testing.assert_array_equal(values, want_values)
        taken = pool.allocate(pool.available_blocks, "check")
        assert pool.free_blocks == 0
        pool.release_blocks(taken, "check")
        pool.check_invariants()


def store_fresh(world):
    reservation = world.pool.reserve(4, "store")
    caches = caches_of(300, 1)

    def operation():
        return cache_to_blocks(world.pool, "store", caches, list(range(300)), reservation=reservation)

    def finish(handle):
        reservation.cancel()
        if handle is not None:
            handle.release()

    return operation, finish


def store_continuing(world):
    caches = caches_of(700, 2)

    def operation():
        return cache_to_blocks(world.pool, "keep", caches, world.keep_tokens + list(range(100)), source=world.keep,
                               reused_tokens=600)

    return operation, lambda handle: handle is not None and handle.release()


def share(world):
    return (lambda: world.pool.share(world.keep, "fork")), (lambda handle: handle is not None and handle.release())


def release(world):
    handle = world.pool.share(world.keep, "fork")

    def finish(_):
        if not handle.released:  # what the engine does after an interrupt (_completed_through_interrupts)
            handle.release()

    return handle.release, finish


def release_by_collection(world):
    world.pool.share(world.keep, "fork")  # dropped at once: its finalizer queues its blocks
    return (lambda: world.pool.free_blocks), (lambda _: None)


def rebuild_of_views(world):
    return (lambda: blocks_to_cache(world.pool, world.keep)), (lambda caches: None)


def cancel_reservation(world):
    reservation = world.pool.reserve(5, "request")
    return reservation.cancel, lambda _: reservation.cancel()


def reserve(world):
    return (lambda: world.pool.reserve(3, "request")), (lambda reservation: reservation and reservation.cancel())


def builder_dropped_unfinished(world):
    """A builder left without ``with`` and without finishing: its references go back once it is collected."""

    def operation():
        builder = world.pool.build_handle("fork")
        builder.retain(world.keep.layer_block_ids(0), of=world.keep)
        builder.allocate(3)

    return operation, lambda _: None


def failed_store(world):
    """A store whose tokens are refused after its blocks were taken: its rollback is what gets interrupted."""
    caches = caches_of(300, 3)

    def operation():
        with pytest.raises(Exception, match="non-negative"):
            cache_to_blocks(world.pool, "store", caches, [-1] * 300)

    return operation, lambda _: None


OPERATIONS = [store_fresh, store_continuing, share, release, release_by_collection, rebuild_of_views, reserve,
              cancel_reservation, builder_dropped_unfinished, failed_store]


@pytest.mark.parametrize("make", OPERATIONS, ids=[op.__name__ for op in OPERATIONS])
def test_an_interrupt_at_any_point_of_an_operation_leaves_the_pool_whole(make):
    def run(at):
        world = World()
        operation, finish = make(world)
        result, interrupted, tracer = traced(operation, TRACED, at)
        assert not tracer.swallowed(interrupted), f"{make.__name__}: the interrupt at point {at} was swallowed"
        finish(result)
        try:
            world.check_after()
        except AssertionError as error:
            raise AssertionError(f"{make.__name__}, interrupted at point {at}: {error}")
        return tracer.count

    at_every_point(run, minimum=3, second=(1, 3, 8))
