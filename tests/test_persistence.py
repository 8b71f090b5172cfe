"""AgentCacheStore: the two tiers, eviction, restarts, and a state machine against a model of both tiers."""

import errno
import os
import shutil
import tempfile
import warnings

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.errors import (IncompatibleCacheError, InvalidRequestError, PoolExhaustedError,
                                    ReleasedHandleError)
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import store as store_module
from semantic.persistence.directory import CACHE_SUFFIX, CacheDirectory
from semantic.testing.local_models import load_local_model
from semantic.persistence import (
    AgentCacheStore,
    CacheBudgetWarning,
    CacheCorruptionError,
    CacheReadError,
    CacheSyncError,
    CacheWriteError,
    InvalidAgentIdError,
    UnknownAgentError,
)
from test_persistence_support import (
    SMALL_SPEC,
    directory_state,
    loaded_snapshot,
    nothing_changes,
    open_store,
    random_handle,
    snapshot,
    temp_files,
)

AGENT_BYTES = SMALL_SPEC.bytes_per_agent(11)  # 8 blocks: 3 + 2 (window) + 3


def put_new(store, agent_id, n_tokens=11, seed=0):
    """Put a fresh context for ``agent_id``; returns its snapshot."""
    handle = random_handle(store.pool, agent_id, n_tokens, seed)
    expected = snapshot(handle)
    store.put(handle)
    return expected


def current(store, agent_id):
    with store.get(agent_id) as handle:
        return snapshot(handle)


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path)


def test_put_keeps_the_context_in_the_pool_and_get_shares_it(store):
    expected = put_new(store, "a")
    used = store.pool.used_blocks
    with store.get("a") as shared:
        assert snapshot(shared) == expected
        assert store.pool.used_blocks == used  # a share, not a copy
    assert store.resident == ("a",) and store.list() == ["a"] and "a" in store
    assert not store.directory.joinpath("a.safetensors").exists()  # written on eviction, flush or close


def test_get_of_an_agent_on_disk_reads_it_into_pool_blocks(store):
    with random_handle(store.pool, "a", 11, seed=1) as handle:
        store.save(handle)
        expected = snapshot(handle)
    assert store.resident == () and store.pool.used_blocks == 0
    with store.get("a") as loaded:
        assert snapshot(loaded) == expected
        assert store.pool.used_blocks == loaded.num_blocks == 8
    assert store.resident == ("a",)
    store.evict("a")  # its file is current: nothing is written
    assert store.pool.used_blocks == 0


def test_the_budget_moves_least_recently_used_agents_to_disk(tmp_path):
    store = open_store(tmp_path, memory_budget_bytes=2 * AGENT_BYTES)
    a, b = put_new(store, "a", seed=1), put_new(store, "b", seed=2)
    current(store, "a")  # "a" is now more recent than "b"
    c = put_new(store, "c", seed=3)
    assert store.resident == ("a", "c") and store.resident_bytes <= store.memory_budget_bytes
    assert loaded_snapshot(store, "b") == b  # written on the way out
    assert [current(store, agent) for agent in "abc"] == [a, b, c]
    assert store.resident_bytes <= store.memory_budget_bytes and store.pool.used_blocks * store.pool.block_bytes \
        <= store.memory_budget_bytes


def test_blocks_shared_between_agents_count_once_against_the_budget(tmp_path):
    store = open_store(tmp_path, memory_budget_bytes=AGENT_BYTES)
    with random_handle(store.pool, "a", 11, seed=1) as handle:
        store.put(handle.share())
        store.put(handle.share("b"))  # a fork: the same blocks
    assert store.resident == ("a", "b") and store.resident_bytes == AGENT_BYTES


def test_a_full_pool_moves_least_recently_used_agents_to_disk_to_load_another(tmp_path):
    store = open_store(tmp_path, total_blocks=16)  # two agents
    with random_handle(store.pool, "c", 11, seed=3) as handle:
        store.save(handle)
        c = snapshot(handle)
    a, b = put_new(store, "a", seed=1), put_new(store, "b", seed=2)
    assert current(store, "c") == c
    assert store.resident == ("b", "c")
    assert loaded_snapshot(store, "a") == a  # written on the way out
    assert [current(store, agent) for agent in "abc"] == [a, b, c]


def test_nothing_is_evicted_when_handles_held_elsewhere_pin_the_blocks(tmp_path):
    store = open_store(tmp_path, total_blocks=16)  # two agents
    with random_handle(store.pool, "b", 11, seed=2) as handle:
        store.save(handle)
    a = put_new(store, "a", seed=1)
    with store.get("a") as pinned, random_handle(store.pool, "c", 11, seed=3):  # the pool is full
        assert not store.make_room(1)  # evicting "a" would free nothing: "pinned" holds its blocks
        with nothing_changes(store), pytest.raises(PoolExhaustedError, match="cannot free enough"):
            store.get("b")
    assert store.make_room(16) and store.resident == ()
    assert loaded_snapshot(store, "a") == a


def test_save_makes_a_resident_agent_current_on_both_tiers(store):
    put_new(store, "a", seed=1)
    with random_handle(store.pool, "a", 7, seed=2) as handle:
        store.save(handle)
        expected = snapshot(handle)
    assert current(store, "a") == loaded_snapshot(store, "a") == expected


def test_load_reads_the_file_even_when_a_newer_context_is_resident(store):
    with random_handle(store.pool, "a", 11, seed=1) as handle:
        store.save(handle)
        saved = snapshot(handle)
    newer = put_new(store, "a", seed=2)
    assert loaded_snapshot(store, "a") == saved and current(store, "a") == newer


def test_write_through_puts_are_on_disk_when_put_returns(tmp_path):
    store = open_store(tmp_path, write_through=True)
    expected = put_new(store, "a")
    assert store.resident == ("a",)
    assert loaded_snapshot(open_store(tmp_path), "a") == expected  # another process would find it


def test_delete_forgets_both_tiers(store):
    put_new(store, "a")
    with random_handle(store.pool, "b", 5, seed=1) as handle:
        store.save(handle)
    put_new(store, "b")
    assert store.delete("a") and store.delete("b") and not store.delete("b")
    assert store.list() == [] and store.pool.used_blocks == 0 and list(store.directory.iterdir()) == []
    with pytest.raises(UnknownAgentError):
        store.get("b")


def test_close_writes_every_agent_and_a_new_process_sees_them(tmp_path):
    with open_store(tmp_path) as store:
        expected = {agent: put_new(store, agent, n_tokens=3 * seed + 1, seed=seed) for seed, agent in enumerate("abc")}
    assert store.resident == () and store.pool.used_blocks == 0
    restarted = open_store(tmp_path)
    assert restarted.list() == ["a", "b", "c"]
    assert {agent: current(restarted, agent) for agent in "abc"} == expected


def test_handles_of_another_pool_are_refused(store):
    other = BlockPool(SMALL_SPEC, 20)
    with random_handle(other, "a", 5, seed=0) as handle:
        for call in (store.save, store.put):
            with nothing_changes(store), pytest.raises(IncompatibleCacheError, match="belong to pool"):
                call(handle)


def test_a_handle_whose_blocks_do_not_fit_its_tokens_is_refused_before_any_file_is_written(store):
    """A file of another layout could be written but never read back: once the handle's blocks were released,
    its context would be lost."""
    pool = store.pool
    with pool.build_handle("a") as builder:  # 1,000 tokens in one block per layer
        handle = builder.finish(list(range(1000)), [builder.allocate(1) for _ in range(SMALL_SPEC.n_layers)])
    for call in (store.save, store.put):
        with nothing_changes(store), pytest.raises(InvalidRequestError, match="do not fit a context of 1000 tokens"):
            call(handle)
    assert not handle.released
    handle.release()


def test_a_token_id_no_file_can_hold_is_refused_at_the_door_and_the_store_goes_on(tmp_path):
    """Python's JSON writer refuses ints of over 4,300 digits: such a context was put, and its eviction then
    failed with a ValueError, and with it every later put and get that needed room."""
    store = open_store(tmp_path, memory_budget_bytes=AGENT_BYTES)
    with store.pool.build_handle("a") as builder:
        handle = builder.finish([10**5000] * 11, [builder.allocate(n) for n in SMALL_SPEC.blocks_per_layer(11)])
    for call in (store.save, store.put):
        with nothing_changes(store), pytest.raises(InvalidRequestError, match="token id"):
            call(handle)
    handle.release()
    expected = {agent: put_new(store, agent, seed=i) for i, agent in enumerate("bc")}  # c's put evicts b
    assert store.resident == ("c",) and {agent: current(store, agent) for agent in "bc"} == expected


def test_a_lock_timeout_beyond_a_float_waits_without_limit(tmp_path):
    """10**400 seconds has no float: the first save's deadline raised OverflowError, and so did every save."""
    store = open_store(tmp_path, lock_timeout=10**400)
    with random_handle(store.pool, "a", 11, seed=0) as handle:
        store.save(handle)
        assert loaded_snapshot(store, "a") == snapshot(handle)


def test_a_put_handle_released_by_its_caller_breaks_nothing_for_the_other_agents(tmp_path):
    """The store keeps a share of its own: a caller releasing the handle it gave (a misuse) gets the error
    itself, and every other agent's put, get, flush and close go on working."""
    store = open_store(tmp_path, memory_budget_bytes=3 * AGENT_BYTES)
    given = random_handle(store.pool, "a", 11, seed=0)
    expected = snapshot(given)
    store.put(given)
    with pytest.raises(ReleasedHandleError):
        given.release()
    others = {agent: put_new(store, agent, seed=i + 1) for i, agent in enumerate("bcde")}  # evicts "a" to disk
    assert {agent: current(store, agent) for agent in "abcde"} == {"a": expected, **others}
    store.flush()
    store.close()
    assert open_store(tmp_path).list() == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("kwargs", [{"memory_budget_bytes": -1}, {"memory_budget_bytes": 1.5}, {"lock_timeout": -1},
                                    {"memory_budget_bytes": True}, {"lock_timeout": None}, {"lock_timeout": "1"},
                                    {"model_fingerprint": ""}, {"model_fingerprint": "a\x00b"},
                                    {"model_fingerprint": 5}, {"write_through": "no"}, {"write_through": 1},
                                    {"directory": None}, {"directory": "/tmp/x\x00y"},
                                    # str() of an int of over 4,300 digits: ValueError from the message before
                                    {"model_fingerprint": 10**5000}, {"write_through": 10**5000}])
def test_bad_construction_arguments_are_refused(tmp_path, kwargs):
    arguments = {"directory": tmp_path, "model_fingerprint": "model", **kwargs}
    with pytest.raises(InvalidRequestError):
        AgentCacheStore(arguments.pop("directory"), BlockPool(SMALL_SPEC, 4), **arguments)


@pytest.mark.parametrize("agent_id", [[], {}, None, 5, ""])
def test_membership_of_something_that_is_not_an_agent_id_is_a_typed_error(store, agent_id):
    with pytest.raises(InvalidAgentIdError):
        agent_id in store  # noqa: B015 (TypeError "unhashable" for a list before)


@pytest.mark.parametrize("agent_id", [[], {}, 10**5000, [10**5000]],
                         ids=["list", "dict", "huge int", "list of a huge int"])
@pytest.mark.parametrize("call", ["get", "load", "delete", "evict", "contains"])
def test_every_call_refuses_what_is_not_an_agent_id_with_a_typed_error(store, agent_id, call):
    """delete of a list raised TypeError (unhashable, from its bookkeeping after the refusal); an int of over
    4,300 digits made the refusal's own message raise ValueError."""
    put_new(store, "a")
    with nothing_changes(store), pytest.raises(InvalidAgentIdError):
        agent_id in store if call == "contains" else getattr(store, call)(agent_id)  # noqa: B015


def test_generate_refuses_an_engine_that_is_not_one_with_a_typed_error(store):
    """An AttributeError (None has no pool) before."""
    for engine in (None, store.pool, "engine"):
        with nothing_changes(store), pytest.raises(InvalidRequestError, match="BlockPoolBatchEngine"):
            store.generate(engine, "a", "hello", max_tokens=2)


def test_listing_a_directory_removed_under_the_store_is_a_typed_error(tmp_path):
    store = open_store(tmp_path / "agents")
    put_new(store, "a")
    shutil.rmtree(store.directory)
    with pytest.raises(CacheReadError, match="cannot list"):
        store.list()  # FileNotFoundError before


def test_a_directory_named_like_a_leftover_temp_file_does_not_stop_the_store_opening(tmp_path):
    (tmp_path / ".alice.0123456789ab.tmp").mkdir()  # IsADirectoryError from the constructor before
    store = open_store(tmp_path)
    put_new(store, "alice")
    store.save(store.get("alice"))
    assert (tmp_path / ".alice.0123456789ab.tmp").is_dir() and store.list() == ["alice"]


def test_a_handle_released_elsewhere_while_it_is_saved_cannot_put_another_agents_data_in_its_file(tmp_path):
    """The save holds its own reference: before, the blocks a concurrent release freed could be reused
    mid-save, and the file held another agent's keys under valid checksums."""
    store = open_store(tmp_path, total_blocks=16)
    alice = random_handle(store.pool, "alice", 11, seed=1)
    expected = snapshot(alice)
    real_gather = store.pool.gather_stored

    def another_thread_between_the_ids_and_the_gather(layer_block_ids):
        if not other:  # the first of the save's gathers (one per block count)
            alice.release()
            other.append(random_handle(store.pool, "bob", 11, seed=2))  # reuses whatever the release freed
        return real_gather(layer_block_ids)

    other = []
    store.pool.gather_stored = another_thread_between_the_ids_and_the_gather
    store.save(alice)
    del store.pool.gather_stored
    assert loaded_snapshot(store, "alice") == expected


def test_opening_a_store_deletes_only_temp_files_of_its_own_saves(tmp_path):
    """Before, any ``.<word>.<anything>.tmp`` counted as an abandoned save: a store opened on a directory of
    other files deleted them (and left lock files for them)."""
    foreign = [".notes.backup.tmp", ".vimrc.tmp", ".bash_history.tmp", ".alice.0123456789AB.tmp", "keep.tmp"]
    for name in foreign:
        (tmp_path / name).write_text("someone else's data")
    (tmp_path / ".alice.0123456789ab.tmp").write_bytes(b"a save killed mid-write")
    open_store(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(foreign)  # alice has no file: no lock either
    assert all((tmp_path / name).read_text() == "someone else's data" for name in foreign)


def test_file_names_that_are_not_utf8_are_ignored_and_paths_that_are_not_paths_refused(tmp_path):
    """A UnicodeEncodeError stopped the store opening (a temp file's name) or listing (a cache file's); a
    RuntimeError came out for ~user of an unknown user."""
    for name in (b".\xff.0123456789ab.tmp", b"\xff.safetensors"):
        os.close(os.open(os.path.join(os.fsencode(tmp_path), name), os.O_CREAT | os.O_WRONLY))
    store = open_store(tmp_path)
    put_new(store, "bob")
    store.flush()
    assert store.list() == ["bob"]
    assert len(os.listdir(os.fsencode(tmp_path))) == 4  # theirs, bob's file and lock
    for path in ("~no-such-user-x/cache", 12, b"bytes", "nul\0byte"):
        with pytest.raises(InvalidRequestError):
            open_store(path)


def test_a_leftover_temp_file_of_an_agent_whose_lock_is_unusable_does_not_stop_the_store_opening(tmp_path):
    (tmp_path / ".alice.lock").mkdir()
    (tmp_path / ".alice.0123456789ab.tmp").write_bytes(b"a save killed mid-write")
    store = open_store(tmp_path)  # CacheWriteError from the constructor before
    put_new(store, "bob")
    store.flush()
    assert store.list() == ["bob"]


def unwritable(store, agent_id):
    """Make every write of ``agent_id``'s file fail (its lock path is a directory)."""
    (store.directory / f".{agent_id}.lock").mkdir()


def test_an_agent_that_cannot_be_written_does_not_stop_close_from_saving_the_others(tmp_path):
    store = open_store(tmp_path)
    expected = {agent: put_new(store, agent, seed=i) for i, agent in enumerate("xyz")}
    unwritable(store, "y")
    with pytest.raises(CacheWriteError, match="lock file"):
        store.close()  # before: raised at y, z was never written and every block stayed held
    assert store.resident == ("y",)  # its context kept: releasing it would lose it
    assert store.pool.used_blocks == SMALL_SPEC.blocks_per_agent(11)  # y's blocks only
    assert {agent: loaded_snapshot(store, agent) for agent in "xz"} == {a: expected[a] for a in "xz"}
    (store.directory / ".y.lock").rmdir()
    store.close()
    assert store.resident == () and store.pool.used_blocks == 0
    assert loaded_snapshot(store, "y") == expected["y"]


def test_several_agents_that_cannot_be_written_are_named_in_one_error(tmp_path):
    store = open_store(tmp_path)
    for i, agent in enumerate("xyz"):
        put_new(store, agent, seed=i)
    unwritable(store, "x")
    unwritable(store, "z")
    with pytest.raises(CacheWriteError, match="2 agents.*'x'.*'z'"):
        store.flush()
    assert store.list() == ["x", "y", "z"]
    assert [p.name for p in store.directory.glob("*.safetensors")] == ["y.safetensors"]


def test_eviction_passes_over_an_agent_that_cannot_be_written(tmp_path):
    """The budget and make_room evict least recently used agents; one that cannot be written stays resident
    and the next is evicted instead (before, every later put/get raised, naming that agent, and the budget
    was never enforced again)."""
    store = open_store(tmp_path, total_blocks=24, memory_budget_bytes=2 * AGENT_BYTES)
    put_new(store, "victim", seed=1)
    unwritable(store, "victim")
    bob = put_new(store, "bob", seed=2)
    put_new(store, "carol", seed=3)  # over budget: victim cannot go, bob can
    assert store.resident == ("victim", "carol") and loaded_snapshot(store, "bob") == bob
    assert store.make_room(store.pool.available_blocks + 8)  # carol goes, victim stays
    assert store.resident == ("victim",)
    with pytest.raises(CacheWriteError, match="lock file"):  # only victim's blocks are left to free
        store.make_room(store.pool.available_blocks + 1)
    assert store.resident == ("victim",)


@pytest.mark.filterwarnings("ignore::semantic.persistence.CacheBudgetWarning")  # the gets below warn too
def test_put_keeps_its_promise_when_the_budget_cannot_be_met(tmp_path):
    """Before, put raised after taking the handle over, when evicting another agent failed: a caller who
    then released the handle, as the docstring allows, left the store holding a released handle. Now the
    put succeeds and the budget is left exceeded, with a warning naming the agent that could not move."""
    store = open_store(tmp_path)
    victim = put_new(store, "victim", seed=1)
    unwritable(store, "victim")
    store.memory_budget_bytes = 0
    with pytest.warns(CacheBudgetWarning, match="victim"):
        expected = put_new(store, "new", seed=2)  # raised CacheWriteError before, the handle taken over
    assert store.resident == ("victim",)
    assert current(store, "new") == expected and current(store, "victim") == victim
    (store.directory / ".victim.lock").rmdir()
    store.close()
    assert store.resident == () and store.pool.used_blocks == 0


def test_a_budget_warning_turned_into_an_error_leaves_the_put_handle_with_its_caller(tmp_path):
    """With warnings as errors, put raised the budget warning after it had released the caller's handle."""
    store = open_store(tmp_path)
    put_new(store, "victim", seed=1)
    unwritable(store, "victim")
    store.memory_budget_bytes = 0
    handle = random_handle(store.pool, "new", 11, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheBudgetWarning)
        with pytest.raises(CacheBudgetWarning):
            store.put(handle)
    assert not handle.released
    with pytest.warns(CacheBudgetWarning):  # get: still over the budget
        assert current(store, "new") == snapshot(handle)
    handle.release()
    (store.directory / ".victim.lock").rmdir()
    store.close()
    assert store.resident == () and store.pool.used_blocks == 0


def failing_directory_sync(monkeypatch):
    def sync(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(CacheDirectory, "_sync_directory", sync)


def test_a_save_whose_directory_sync_fails_says_the_new_file_is_in_place_and_keeps_it_current(tmp_path,
                                                                                              monkeypatch):
    """The rename had happened, yet the error said the previous file was unchanged, and the store kept
    the old context in memory marked as on disk (evicting it then switched the agent to the new one)."""
    store = open_store(tmp_path)
    put_new(store, "a", seed=1)
    store.flush()
    new = random_handle(store.pool, "a", 7, seed=9)
    expected = snapshot(new)
    with monkeypatch.context() as patch:
        failing_directory_sync(patch)
        with pytest.raises(CacheSyncError, match="saved agent 'a'.*save again"):
            store.save(new)
    assert current(store, "a") == expected and loaded_snapshot(store, "a") == expected
    new.release()
    store.close()  # written again, durably
    assert loaded_snapshot(store, "a") == expected and store.pool.used_blocks == 0


def test_a_write_through_put_whose_directory_sync_fails_makes_its_context_current(tmp_path, monkeypatch):
    """The file holds the new context once renamed: before, the previous one stayed resident marked as on disk,
    so an eviction dropped it and the store went back to the file the failed put had written."""
    store = open_store(tmp_path, write_through=True)
    put_new(store, "a", seed=1)
    new = random_handle(store.pool, "a", 11, 2)
    expected = snapshot(new)
    with monkeypatch.context() as patch:
        failing_directory_sync(patch)
        with pytest.raises(CacheSyncError, match="saved agent 'a'"):
            store.put(new)
    new.release()  # still the caller's after the error
    assert current(store, "a") == expected and loaded_snapshot(store, "a") == expected
    store.close()  # written again, durably
    assert loaded_snapshot(store, "a") == expected and store.pool.used_blocks == 0


def test_asking_about_an_agent_in_a_directory_that_cannot_be_searched_is_a_read_error(tmp_path, monkeypatch):
    """A directory without search permission made ``agent in store`` (and ``store.generate``) raise a bare
    PermissionError, where ``get`` said CacheReadError. Root ignores permissions: the OSError is injected."""
    store = open_store(tmp_path)
    put_new(store, "resident")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(os, "lstat", denied)
        assert "resident" in store  # known without the directory
        with pytest.raises(CacheReadError, match="Permission denied"):
            "nobody" in store
    assert "nobody" not in store


def test_a_store_for_something_not_an_engine_is_a_typed_error(tmp_path):
    for not_an_engine in (None, open_store(tmp_path).pool):
        with pytest.raises(InvalidRequestError, match="engine must be a BlockPoolBatchEngine"):
            AgentCacheStore.for_engine(tmp_path, not_an_engine)


def test_a_delete_whose_directory_sync_fails_forgets_the_agent_and_says_so(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    put_new(store, "a")
    store.flush()
    with monkeypatch.context() as patch:
        failing_directory_sync(patch)
        with pytest.raises(CacheSyncError, match="deleted the cache file of agent 'a'"):
            store.delete("a")  # a bare OSError before, the agent still resident
    assert "a" not in store and store.pool.used_blocks == 0


def test_loading_a_context_larger_than_the_whole_pool_says_it_can_never_fit(tmp_path):
    """Before, the error told the caller to release handles, which could never help. It is decided from the
    header, before any tensor is read: a file of a larger pool's context can be larger than MLX may allocate
    (it crashed, reading 60 GiB into a pool of one block). So a damaged tensor is not even seen."""
    put_new(big := open_store(tmp_path), "a", n_tokens=14)
    big.close()
    small = open_store(tmp_path, total_blocks=SMALL_SPEC.blocks_per_agent(14) - 1)
    with nothing_changes(small), pytest.raises(PoolExhaustedError, match="can never fit this pool"):
        small.get("a")
    with open(small.directory / "a.safetensors", "r+b") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
        file.seek(-1, os.SEEK_END)
        file.write(bytes([last[0] ^ 0xFF]))
    with nothing_changes(small), pytest.raises(PoolExhaustedError, match="can never fit this pool"):
        small.get("a")
    with pytest.raises(CacheCorruptionError, match="does not match its checksum"):
        open_store(tmp_path).get("a")


@pytest.mark.parametrize("n_blocks", ["5", None, -1, 1.5, True])
def test_make_room_for_a_count_that_is_not_one_is_refused(tmp_path, n_blocks):
    store = AgentCacheStore(tmp_path, BlockPool(SMALL_SPEC, 4), "model")
    with pytest.raises(InvalidRequestError, match="n_blocks"):
        store.make_room(n_blocks)


# ---- faults at every step: typed errors, no leaked share, memory agreeing with the disk ----------------
def eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def fail_os(monkeypatch, name, when, error=eio, after=False):
    """Make ``os.<name>`` raise ``error()`` on the calls whose arguments satisfy ``when``; with ``after``, once the
    real call is done (an interrupt is raised as the call returns)."""
    real = getattr(os, name)

    def patched(*args, **kwargs):
        if when(*args):
            if after:
                real(*args, **kwargs)
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, patched)


def is_lock(path, *args) -> bool:
    return str(path).endswith(".lock")


def is_temp(path, *args) -> bool:
    return str(path).endswith(".tmp")


def always(*args) -> bool:
    return True


def interrupt():
    raise KeyboardInterrupt


def test_an_interrupt_as_put_replaces_a_resident_context_keeps_the_agent(store, monkeypatch):
    """The previous context was popped before the new one went in: an interrupt in between lost the agent."""
    old = put_new(store, "a", seed=1)
    handle = random_handle(store.pool, "a", 7, seed=2)
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "_Resident", lambda *args: interrupt())  # between the two steps
        with nothing_changes(store), pytest.raises(KeyboardInterrupt):
            store.put(handle)
    assert store.resident == ("a",) and store.list() == ["a"] and current(store, "a") == old
    assert not handle.released  # a put that raised leaves the handle with its caller
    handle.release()
    store.close()
    assert store.pool.used_blocks == 0 and loaded_snapshot(store, "a") == old


def test_a_budget_warning_turned_into_an_error_by_get_leaks_no_share(tmp_path):
    """get made the caller's share, then raised the budget warning: the share stayed with the error."""
    store = open_store(tmp_path)
    put_new(store, "victim", seed=1)
    unwritable(store, "victim")
    with random_handle(store.pool, "a", 11, seed=2) as handle:
        store.save(handle)
    store.memory_budget_bytes = 0
    victims_blocks = store.pool.used_blocks
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheBudgetWarning)
        with pytest.raises(CacheBudgetWarning) as raised:
            store.get("a")
    # "a" was read in, then moved out again by the budget: nothing of it may stay held, not even by the error.
    assert isinstance(raised.value, CacheBudgetWarning) and store.pool.used_blocks == victims_blocks
    assert store.resident == ("victim",) and store.list() == ["a", "victim"]
    store.pool.check_invariants()


def test_a_delete_whose_lock_file_cannot_be_removed_still_forgets_the_agent(store, monkeypatch):
    """The file was gone, then unlinking the lock raised: the OSError came out and the agent stayed resident."""
    put_new(store, "a")
    store.flush()
    with monkeypatch.context() as patch:
        fail_os(patch, "unlink", is_lock)
        assert store.delete("a")
    assert "a" not in store and store.list() == [] and store.resident == () and store.pool.used_blocks == 0
    assert (store.directory / ".a.lock").exists()  # left behind: advisory, the next save takes it
    expected = put_new(store, "a", seed=3)
    store.flush()
    assert loaded_snapshot(store, "a") == expected


def test_an_error_closing_a_lock_file_does_not_fail_what_the_lock_guarded(store, monkeypatch):
    """The save or delete was done, then closing its lock raised a bare OSError."""
    put_new(store, "b")
    store.flush()
    lock_fds, real_open, real_close = set(), os.open, os.close

    def opening(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if is_lock(path):
            lock_fds.add(fd)
        return fd

    def closing(fd):
        real_close(fd)
        if fd in lock_fds:
            lock_fds.discard(fd)
            raise eio()

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", opening)
        patch.setattr(os, "close", closing)
        with random_handle(store.pool, "a", 11, seed=1) as handle:
            store.save(handle)
            expected = snapshot(handle)
        assert store.delete("b")
    assert store.list() == ["a"] and store.resident == () and store.pool.used_blocks == 0
    assert loaded_snapshot(store, "a") == expected


@pytest.mark.parametrize("when", ["as the rename returns", "in the directory sync"])
@pytest.mark.parametrize("how", ["save", "write-through put"])
def test_an_interrupt_after_the_rename_makes_the_new_context_current_until_written_again(tmp_path, monkeypatch,
                                                                                          when, how):
    """The file held the new context, but memory kept the old one marked as on disk (save) or not the new one at
    all (put): get and load disagreed, and evicting the agent switched it to the file."""
    store = open_store(tmp_path, write_through=how != "save")
    put_new(store, "a", seed=1)
    store.flush()
    new = random_handle(store.pool, "a", 7, seed=9)
    expected = snapshot(new)
    with monkeypatch.context() as patch:
        if when == "as the rename returns":
            fail_os(patch, "replace", always, KeyboardInterrupt, after=True)
        else:
            patch.setattr(CacheDirectory, "_sync_directory", lambda self: interrupt())
        with pytest.raises(KeyboardInterrupt):
            (store.save if how == "save" else store.put)(new)
    assert not new.released  # still the caller's
    new.release()
    assert store.resident == ("a",) and current(store, "a") == loaded_snapshot(store, "a") == expected
    assert store.pool.used_blocks == SMALL_SPEC.blocks_per_agent(7)  # the old context was let go
    renames, real_replace = [], os.replace
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", lambda *args: renames.append(args) or real_replace(*args))
        store.flush()  # not durable yet: written again
    assert len(renames) == 1
    store.close()
    assert store.pool.used_blocks == 0 and loaded_snapshot(store, "a") == expected


@pytest.mark.parametrize("when", ["as the unlink returns", "in the directory sync"])
def test_an_interrupt_after_a_delete_removed_the_file_forgets_the_agent(store, monkeypatch, when):
    """The file was gone, but the agent stayed resident (and listed), marked as on disk."""
    put_new(store, "a")
    store.flush()
    with monkeypatch.context() as patch:
        if when == "as the unlink returns":
            fail_os(patch, "unlink", lambda path: str(path).endswith(CACHE_SUFFIX), KeyboardInterrupt, after=True)
        else:
            patch.setattr(CacheDirectory, "_sync_directory", lambda self: interrupt())
        with pytest.raises(KeyboardInterrupt):
            store.delete("a")
    assert "a" not in store and store.list() == [] and store.resident == () and store.pool.used_blocks == 0


def test_a_failed_save_whose_temp_file_cannot_be_removed_is_still_a_write_error(store, monkeypatch):
    """Removing the temp file raised, and its bare OSError replaced the save's CacheWriteError."""
    old = put_new(store, "a", seed=1)
    store.flush()
    files = directory_state(store.directory)
    with random_handle(store.pool, "a", 7, seed=2) as handle, monkeypatch.context() as patch:
        fail_os(patch, "fsync", always)
        fail_os(patch, "unlink", is_temp)
        with pytest.raises(CacheWriteError, match="previous file, if any, is unchanged"):
            store.save(handle)
    assert len(temp_files(store.directory)) == 1  # left behind, never read
    assert {k: v for k, v in directory_state(store.directory).items() if not is_temp(k)} == files
    assert current(store, "a") == loaded_snapshot(store, "a") == old
    reopened = open_store(store.directory)  # removes it
    assert temp_files(store.directory) == [] and loaded_snapshot(reopened, "a") == old


def test_a_lock_file_is_left_only_beside_an_agents_file(store, monkeypatch):
    """A first save that failed left its new lock file behind: hidden files that piled up, one per agent that
    never saved (clearing a leftover temp file did the same: see
    test_opening_a_store_deletes_only_temp_files_of_its_own_saves)."""
    with random_handle(store.pool, "a", 7, seed=2) as handle:
        with monkeypatch.context() as patch, nothing_changes(store):
            fail_os(patch, "fsync", always)
            with pytest.raises(CacheWriteError, match="previous file, if any, is unchanged"):
                store.save(handle)
        assert list(store.directory.iterdir()) == []
        store.save(handle)
        assert sorted(p.name for p in store.directory.iterdir()) == [".a.lock", "a.safetensors"]
        assert store.delete("a") and list(store.directory.iterdir()) == []


def test_a_store_opens_even_if_a_leftover_temp_file_cannot_be_removed(tmp_path, monkeypatch):
    """The bare OSError of the unlink came out of the constructor: the directory could not be opened at all."""
    expected = put_new(first := open_store(tmp_path), "a")
    first.close()
    (tmp_path / ".a.0123456789ab.tmp").write_bytes(b"half a save")
    with monkeypatch.context() as patch:
        fail_os(patch, "unlink", is_temp)
        store = open_store(tmp_path)
    assert store.list() == ["a"] and loaded_snapshot(store, "a") == expected
    assert temp_files(tmp_path) == [".a.0123456789ab.tmp"]


def test_an_interrupt_during_a_save_is_not_turned_into_a_write_error_by_a_failing_close(store, monkeypatch):
    """Closing the temp file after the interrupt raised, and that error (a CacheWriteError) hid the interrupt."""
    old = put_new(store, "a", seed=1)
    store.flush()
    temp_fds, real_open = set(), os.open

    def opening(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if is_temp(path):
            temp_fds.add(fd)
        return fd

    with random_handle(store.pool, "a", 7, seed=2) as handle, nothing_changes(store), monkeypatch.context() as patch:
        patch.setattr(os, "open", opening)
        fail_os(patch, "fsync", lambda fd: fd in temp_fds, KeyboardInterrupt)
        fail_os(patch, "close", lambda fd: fd in temp_fds, after=True)
        with pytest.raises(KeyboardInterrupt):
            store.save(handle)
    assert current(store, "a") == loaded_snapshot(store, "a") == old and temp_files(store.directory) == []


def test_an_error_checking_the_lock_file_is_a_write_error(store, monkeypatch):
    """A bare OSError came out of the lock (its stat after locking)."""
    with random_handle(store.pool, "a", 7, seed=2) as handle, nothing_changes(store, except_file=".a.lock"):
        with monkeypatch.context() as patch:
            fail_os(patch, "stat", is_lock)
            with pytest.raises(CacheWriteError, match="cannot check the lock file"):
                store.save(handle)


# ---- faults in a turn on a real model ------------------------------------------------------------------
def tiny_engine(total_blocks: int) -> BlockPoolBatchEngine:
    model, tokenizer = load_local_model("tiny-llama")
    return BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), total_blocks))


def test_a_write_through_turn_whose_write_fails_leaks_no_share(tmp_path, monkeypatch):
    """generate shared the turn for put, and when put raised it kept that share and made another for the store."""
    engine = tiny_engine(48)
    store = AgentCacheStore.for_engine(tmp_path, engine, write_through=True)
    with monkeypatch.context() as patch:
        fail_os(patch, "replace", always)
        with pytest.raises(CacheWriteError) as raised:
            store.generate(engine, "a", "the old river ran past a quiet town", max_tokens=3)
    turn = raised.value.completion
    blocks = [block for ids in turn.blocks.all_block_ids for block in ids]
    context = turn.blocks.token_ids
    turn.blocks.release()
    # While the error is alive, each block is held once: by the store's resident context.
    assert [store.pool.refcount(block) for block in blocks] == [1] * len(blocks)
    assert store.pool.used_blocks == len(set(blocks)) and engine.pending == 0
    assert store.resident == ("a",) and store.list() == ["a"]
    store.close()  # written now
    assert store.pool.used_blocks == 0
    with store.load("a") as saved:
        assert saved.token_ids == context


def test_a_turn_whose_eviction_cannot_write_is_cancelled(tmp_path):
    """make_room's CacheWriteError came out of generate with the request still in the engine, holding blocks."""
    engine = tiny_engine(12)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    words = "the old river ran past a quiet town where people made bread and told long stories".split()
    a, b = (" ".join(words[(offset + i) % len(words)] for i in range(300)) for offset in (0, 1))
    store.generate(engine, "a", a, max_tokens=8).blocks.release()  # 8 of 12 blocks, resident
    (store.directory / ".a.lock").mkdir()  # "a" cannot be moved to disk
    with nothing_changes(store), pytest.raises(CacheWriteError, match="lock file"):
        store.generate(engine, "b", b, max_tokens=8)
    assert engine.pending == 0 and store.list() == ["a"]
    (store.directory / ".a.lock").rmdir()
    assert store.generate(engine, "b", b, max_tokens=8).token_ids  # now "a" can move to disk


def test_a_turn_keeps_other_requests_completions_for_the_next_step(tmp_path):
    """generate dropped them (their tokens and blocks lost), and while it held the last one in its loop variable
    the turn could be refused for blocks nothing else held."""
    engine = tiny_engine(48)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    bob = engine.submit("bob", "the old river ran past a quiet town", max_tokens=3)
    turn = store.generate(engine, "a", "hello there", max_tokens=2)
    assert turn.error is None and engine.pending == 1
    (theirs,) = list(engine.step())
    assert theirs.uid == bob and theirs.error is None and len(theirs.token_ids) == 3
    theirs.blocks.release()
    turn.blocks.release()
    store.close()
    assert engine.pool.used_blocks == 0


def test_a_turn_with_arguments_submit_refuses_changes_nothing(tmp_path):
    """generate fetched the agent's context (read its file into the pool, moved others to disk, made it the
    most recently used) before engine.submit checked the arguments."""
    engine = tiny_engine(48)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    for agent in "ab":
        store.generate(engine, agent, "the old river ran past a quiet town", max_tokens=2).blocks.release()
    store.evict("a")  # on disk only; "b" resident
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(prompt=12345), dict(prompt=[10**9]),
                dict(match_prefix="yes")):
        arguments = dict(prompt=" and then", max_tokens=2) | bad
        for agent in "ab":
            prompt = arguments["prompt"]
            with nothing_changes(store), pytest.raises(InvalidRequestError):
                store.generate(engine, agent, prompt, **{k: v for k, v in arguments.items() if k != "prompt"})
    assert engine.pending == 0 and store.resident == ("b",)
    store.close()


# ---- the state machine ------------------------------------------------------------------------------
AGENTS = st.sampled_from(["a", "A", "agent é", "x y"])
CONTEXTS = st.tuples(st.integers(0, 14), st.integers(0, 3))  # (tokens, seed): up to 11 blocks
POOL_BLOCKS, BUDGET_BLOCKS = 40, 24


class StoreMachine(RuleBasedStateMachine):
    """Random puts, saves, gets, loads, deletes, evictions, flushes and (crash) restarts, checked against
    a model: each agent's current context, and what its file holds. Implicit evictions (budget, make_room)
    are read off ``store.resident``: an agent that leaves the pool must then be on disk."""

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.current, self.on_disk = {}, {}
        self.open()

    def open(self):
        self.store = open_store(self.tmp.name, total_blocks=POOL_BLOCKS,
                                memory_budget_bytes=BUDGET_BLOCKS * SMALL_SPEC.bytes_per_block_per_layer)

    def run(self, operation):
        """Run a store operation and record the evictions it caused."""
        before = set(self.store.resident)
        result = operation()
        for agent in before - set(self.store.resident):
            if agent in self.current:
                self.on_disk[agent] = self.current[agent]
        return result

    def context(self, agent, n_tokens, seed):
        return random_handle(self.store.pool, agent, n_tokens, seed)

    @rule(agent=AGENTS, content=CONTEXTS)
    def put(self, agent, content):
        handle = self.context(agent, *content)
        self.current[agent] = snapshot(handle)
        self.run(lambda: self.store.put(handle))

    @rule(agent=AGENTS, content=CONTEXTS)
    def save(self, agent, content):
        with self.context(agent, *content) as handle:
            self.run(lambda: self.store.save(handle))
            self.current[agent] = self.on_disk[agent] = snapshot(handle)

    @rule(agent=AGENTS)
    def get(self, agent):
        if agent not in self.current:
            with pytest.raises(UnknownAgentError):
                self.store.get(agent)
            return
        with self.run(lambda: self.store.get(agent)) as handle:
            assert snapshot(handle) == self.current[agent]

    @rule(agent=AGENTS)
    def load(self, agent):
        if agent not in self.on_disk:
            with pytest.raises(UnknownAgentError):
                self.store.load(agent)
            return
        with self.run(lambda: self.store.load(agent)) as handle:
            assert snapshot(handle) == self.on_disk[agent]

    @rule(agent=AGENTS)
    def delete(self, agent):
        assert self.store.delete(agent) == (agent in self.current)
        self.current.pop(agent, None)
        self.on_disk.pop(agent, None)

    @rule(agent=AGENTS)
    def evict(self, agent):
        was_resident = agent in self.store.resident
        assert self.run(lambda: self.store.evict(agent)) == was_resident

    @rule(n_blocks=st.integers(0, POOL_BLOCKS + 1))
    def make_room(self, n_blocks):
        made = self.run(lambda: self.store.make_room(n_blocks))
        assert made == (self.store.pool.available_blocks >= n_blocks)

    @rule()
    def flush(self):
        self.store.flush()
        self.on_disk.update((agent, self.current[agent]) for agent in self.store.resident)

    @rule(crash=st.booleans())
    def restart(self, crash):
        if not crash:
            self.store.close()
            self.on_disk.update(self.current)
        self.current = dict(self.on_disk)
        self.open()

    @invariant()
    def nothing_is_lost(self):
        store = self.store
        assert store.list() == sorted(self.current)
        for agent in set(self.current) - set(store.resident):
            assert self.on_disk[agent] == self.current[agent]
        assert store.resident_bytes <= store.memory_budget_bytes
        store.pool.check_invariants()
        assert store.pool.used_blocks * store.pool.block_bytes == store.resident_bytes  # no leaked block

    def teardown(self):
        self.tmp.cleanup()


StoreMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_store_against_a_model_of_both_tiers = StoreMachine.TestCase

