"""Ctrl-C anywhere in an ``AgentCacheStore`` operation, or in a stored agent's turn on the engine: the file holds
the old context or the new one, whole; no temp file is left; the pool holds exactly what the store keeps
resident.

Each operation runs once per point of semantic's code where CPython handles signals (``interrupt_points``),
on a store in which agent "a" has a context on disk, and again with a second Ctrl-C a few points after the
first. After each run the test closes the store (as a program ending after Ctrl-C would), then checks the
pool, the directory, and what a new store on the same directory reads. A second interrupt can stop the
removal of a temp file: the next store that opens the directory removes it."""

import gc
import pathlib
import shutil
import tempfile

import pytest

import semantic
from semantic.adapters import mlx_threads
from semantic.persistence import AgentCacheStore
from semantic.persistence.errors import UnknownAgentError

from conftest import make_engine
from interrupt_points import at_every_point, traced
from test_persistence_support import open_store, random_handle, snapshot, snapshot_of, temp_files

MODULES = {str(path) for path in pathlib.Path(semantic.__file__).parent.rglob("*.py")}


def save(store, new):
    store.save(new)


def put_and_flush(store, new):
    store.put(new)
    store.flush()


def get_from_disk(store, new):
    with store.get("a"):
        pass


def put_then_evict(store, new):
    store.put(new)
    store.evict("a")


def delete(store, new):
    store.delete("a")


def put_then_close(store, new):
    store.put(new)
    store.close()


OPERATIONS = {save: "new", put_and_flush: "new", get_from_disk: "old", put_then_evict: "new", delete: None,
              put_then_close: "new"}


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.__name__ for op in OPERATIONS])
def test_an_interrupt_at_any_point_of_a_store_operation_leaves_file_and_pool_whole(tmp_path, operation, twice):
    # Each run starts from a copy of one saved directory (a store keeps nothing of a save of an agent it does
    # not hold), not a save and two snapshots of its own: the twelve cases 182 -> 129 s on 2 cores.
    template = tmp_path / "template"
    store = open_store(template)
    with random_handle(store.pool, "a", 11, seed=1) as handle:
        store.save(handle)
        old = snapshot(handle)
    new = snapshot_of(store.pool, "a", 13, seed=2)
    store.close()

    def run(at):
        directory = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
        shutil.copytree(template, directory, dirs_exist_ok=True)
        store = open_store(directory)
        new_handle = random_handle(store.pool, "a", 13, seed=2)
        _, interrupted, tracer = traced(lambda: operation(store, new_handle), MODULES, at)
        assert not tracer.swallowed(interrupted), f"the interrupt at point {at} was swallowed"
        if not new_handle.released:  # put takes the caller's handle as the store's own
            new_handle.release()
        store.close()
        del new_handle
        gc.collect()
        store.pool.check_invariants()
        assert store.pool.used_blocks == 0, f"interrupted at point {at}"
        if not isinstance(at, tuple):
            assert temp_files(directory) == [], f"interrupted at point {at}"
        reopened = open_store(directory)
        assert temp_files(directory) == [], f"interrupted at point {at}"
        try:
            with reopened.load("a") as handle:
                on_disk = snapshot(handle)
        except UnknownAgentError:
            on_disk = None
        finished = {"new": new, "old": old, None: None}[OPERATIONS[operation]]
        assert on_disk in ((old, finished) if at is not None else (finished,)), f"interrupted at point {at}"
        reopened.close()
        return tracer.count

    at_every_point(run, minimum=20, **(dict(stride=4, second=(1, 3)) if twice else {}))


def test_an_interrupt_at_any_point_of_a_stored_agents_turn_leaves_file_and_pool_whole(llama32, tmp_path):
    """``store.generate``: the agent's context taken from the store, resumed by the engine, the new context
    kept. Interrupted at every fourth point where Python can (every point passed here, in 76 s on 2 cores),
    then the caller steps the engine until nothing is pending and closes the store: the pool holds nothing,
    no temp file is left, and the agent's file holds its context before the turn or after it."""
    engine = make_engine(llama32, total_blocks=64)
    story = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire " * 6

    def run(at):
        directory = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
        store = AgentCacheStore.for_engine(directory, engine)
        store.generate(engine, "a", story, max_tokens=2).blocks.release()
        with store.get("a") as handle:
            old = handle.token_ids
        turn, interrupted, tracer = traced(lambda: store.generate(engine, "a", " more", max_tokens=3), MODULES, at)
        assert not tracer.swallowed(interrupted), f"the interrupt at point {at} was swallowed"
        if turn is not None:
            turn.blocks.release()
        while engine.pending:  # what the caller does next
            for completion in engine.step_once():
                if completion.error is None:
                    completion.blocks.release()
        completion = turn = None
        store.close()
        gc.collect()
        engine.pool.check_invariants()
        assert engine.pool.used_blocks == 0 and engine.pool.reserved_blocks == 0, f"interrupted at point {at}"
        assert temp_files(directory) == [], f"interrupted at point {at}"
        assert mlx_threads._streams_in_use.is_free(), f"interrupted at point {at}"
        reopened = AgentCacheStore.for_engine(directory, engine)
        with reopened.load("a") as handle:
            on_disk = handle.token_ids
        reopened.close()
        assert on_disk == old or (on_disk[: len(old)] == old and len(on_disk) > len(old)), f"at point {at}"
        return tracer.count

    at_every_point(run, minimum=200, stride=4)
