"""Crash safety: killed saves, a full disk, and processes that save the same agent at once.

Every kill hits a real save in another process. On CPU those processes are
forked, one per trial, from "zygote" processes that import the store once and
run no MLX before forking, so a trial costs its own work rather than a Python
start. Where MLX has initialised CUDA at import (a CUDA context does not survive
a fork), the zygote starts each trial as a fresh Python process instead.
"Old" is the context a trial starts with on disk, "new" the one the child saves.
"""

import errno
import fcntl
import json
import os
import random
import shutil
import subprocess
import threading

import pytest

from semantic.domain.services import BlockPool
from semantic.persistence import AgentCacheStore, CacheLockTimeoutError, CacheWriteError, file_format
from test_persistence_support import (
    CRASH_POOL_BLOCKS,
    CRASH_SPEC,
    CRASH_TOKENS,
    FINGERPRINT,
    loaded_snapshot,
    nothing_changes,
    open_store,
    python_child,
    random_handle,
    snapshot,
    snapshot_of,
    temp_files,
)

OLD_SEED, NEW_SEED = 1, 2

# What a saving child runs: save_forever(task, ready_fd) saves the task's seeds' contexts in turn, forever,
# after arming the OS call `die_in` names (see PHASES) to kill it.
SAVER = """
import json, os, signal, sys, time, traceback
import test_persistence_support as support

def die_in(call, when):
    # pwrite: die once `when` bytes are written; fsync/replace: -n dies before the n-th call, +n after it
    real, state = getattr(os, call), {"calls": 0, "budget": when}
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def pwrite(fd, data, offset):
        if len(data) >= state["budget"]:
            if state["budget"]:
                real(fd, bytes(data[:state["budget"]]), offset)
            die()
        state["budget"] -= len(data)
        return real(fd, data, offset)
    def around(*args):
        state["calls"] += 1
        if when == -state["calls"]:
            die()
        result = real(*args)
        if when == state["calls"]:
            die()
        return result
    setattr(os, call, pwrite if call == "pwrite" else around)

def save_forever(task, ready):
    store = support.open_store(task["directory"], support.CRASH_SPEC, support.CRASH_POOL_BLOCKS)
    handles = [support.random_handle(store.pool, "agent", support.CRASH_TOKENS, s) for s in task["seeds"]]
    if task["die_in"]:
        die_in(*task["die_in"])
    os.write(ready, b"r")
    while True:
        for handle in handles:
            store.save(handle)
"""

# Reads one task per line: {"directory", "seeds", "kill_after", "die_in"}. Starts a child that saves (see
# SAVER); SIGKILLs it `kill_after` seconds after it starts saving, or lets it die in the OS call `die_in`
# names. Prints {"directory", "killed"} per task. A child still saving after DEADLINE_S never reached that
# call: it is ended with SIGTERM and reported not killed, so the test fails instead of waiting forever.
ZYGOTE = SAVER + f"SAVER = {SAVER!r}\n" + """
import subprocess
import mlx.core as mx

FORKABLE = not mx.cuda.is_available()  # a child forked after CUDA's initialisation cannot use it
DEADLINE_S = 120

def start(task, ready_w):
    \"\"\"Starts a saving child; returns its pid and a function that waits for it (ending it after DEADLINE_S)
    and says whether SIGKILL ended it.\"\"\"
    if not FORKABLE:
        code = SAVER + "save_forever(json.loads(sys.argv[1]), int(sys.argv[2]))"
        child = subprocess.Popen([sys.executable, "-c", code, json.dumps(task), str(ready_w)], pass_fds=(ready_w,))
        def killed():
            try:
                return child.wait(DEADLINE_S) == -signal.SIGKILL
            except subprocess.TimeoutExpired:
                child.terminate()
                child.wait()
                return False
        return child.pid, killed
    pid = os.fork()
    if pid == 0:
        try:
            save_forever(task, ready_w)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    def killed():
        deadline = time.monotonic() + DEADLINE_S
        while not (ended := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.005)
        if not ended[0]:
            os.kill(pid, signal.SIGTERM)
            ended = os.waitpid(pid, 0)
        return os.WIFSIGNALED(ended[1]) and os.WTERMSIG(ended[1]) == signal.SIGKILL
    return pid, killed

for line in sys.stdin:
    task = json.loads(line)
    ready_r, ready_w = os.pipe()
    pid, killed = start(task, ready_w)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    if task["kill_after"] is not None:
        time.sleep(task["kill_after"])
        os.kill(pid, signal.SIGKILL)
    print(json.dumps({"directory": task["directory"], "killed": killed()}), flush=True)
"""


# Where every trial is a fresh Python that initialises CUDA and compiles the pool's kernels at their first launch
# (3.5-5 s a trial on an H100 while MLX compiled them all, 2.5 s of it compiling; the gathers' compile now takes
# ms, the store's ~1.5 s), a GPU host's cores run more at once.
ZYGOTES = max(2, min(8, (os.cpu_count() or 2) // 2))


def run_in_zygotes(tasks, n_zygotes=ZYGOTES):
    """Run the tasks, spread over ``n_zygotes`` processes; returns {directory: killed}."""
    zygotes = [python_child(ZYGOTE, stdin=subprocess.PIPE) for _ in range(n_zygotes)]
    for i, task in enumerate(tasks):
        zygotes[i % n_zygotes].stdin.write(json.dumps(task) + "\n")
    results = {}
    for zygote in zygotes:
        zygote.stdin.close()
        results.update((r["directory"], r["killed"]) for r in map(json.loads, zygote.stdout))
        assert zygote.wait() == 0
    return results


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """The old file (to copy into each trial's directory) and both contexts' snapshots."""
    directory = tmp_path_factory.mktemp("template")
    store = open_store(directory, CRASH_SPEC, CRASH_POOL_BLOCKS)
    with random_handle(store.pool, "agent", CRASH_TOKENS, OLD_SEED) as handle:
        store.save(handle)
        old = snapshot(handle)
    new = snapshot_of(store.pool, "agent", CRASH_TOKENS, NEW_SEED)
    return directory / "agent.safetensors", old, new


def trial_directory(tmp_path, name, old_file) -> str:
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(old_file, directory)
    return str(directory)


def reopened_content(directory, pool):
    """What a restarted process finds: opening the store must clean the killed save's temp file."""
    store = AgentCacheStore(directory, pool, FINGERPRINT)
    assert temp_files(directory) == []
    return loaded_snapshot(store, "agent")


def test_a_save_killed_at_a_random_moment_leaves_the_old_or_the_new_file(tmp_path, contexts):
    """100 trials: SIGKILL 0-250 ms into a loop of saves (new, old, new, ...). Every trial's file loads and
    equals the old or the new context, and opening a store removes the killed save's temp file."""
    old_file, old, new = contexts
    rng = random.Random(0)
    tasks = [
        {"directory": trial_directory(tmp_path, f"trial{i}", old_file), "seeds": [NEW_SEED, OLD_SEED],
         "kill_after": rng.uniform(0, 0.25), "die_in": None}
        for i in range(100)
    ]
    killed = run_in_zygotes(tasks)
    assert all(killed[task["directory"]] for task in tasks)
    pool = BlockPool(CRASH_SPEC, CRASH_POOL_BLOCKS)
    outcomes = {"old": 0, "new": 0, "temp file left": 0}
    for task in tasks:
        outcomes["temp file left"] += bool(temp_files(task["directory"]))
        content = reopened_content(task["directory"], pool)
        assert content in (old, new)
        outcomes["new" if content == new else "old"] += 1
    assert pool.used_blocks == 0
    print(outcomes)


# (os call, when) -> the content the file must hold after the kill.
# A save writes data first (after a gap for the header), header last, fsyncs the file, renames, fsyncs the directory.
DATA_BYTES = CRASH_SPEC.bytes_per_agent(CRASH_TOKENS)
PHASES = {
    ("pwrite", 0): "old",
    ("pwrite", 1): "old",
    ("pwrite", DATA_BYTES // 2): "old",
    ("pwrite", DATA_BYTES): "old",  # all data, no header
    ("pwrite", DATA_BYTES + 9): "old",  # the header length and one byte of JSON
    ("fsync", -1): "old",  # everything written, not yet synced
    ("fsync", 1): "old",  # synced, not yet renamed
    ("replace", -1): "old",
    ("replace", 1): "new",  # renamed, directory not yet synced
    ("fsync", 2): "new",  # directory synced
}


def test_a_save_killed_in_each_phase_leaves_the_expected_file(tmp_path, contexts):
    old_file, old, new = contexts
    tasks = [
        {"directory": trial_directory(tmp_path, "-".join(map(str, phase)), old_file), "seeds": [NEW_SEED],
         "kill_after": None, "die_in": phase}
        for phase in PHASES
    ]
    killed = run_in_zygotes(tasks)
    pool = BlockPool(CRASH_SPEC, CRASH_POOL_BLOCKS)
    for task, expected in zip(tasks, PHASES.values()):
        phase, directory = task["die_in"], task["directory"]
        assert killed[directory], f"{phase}: the save was not killed"
        assert bool(temp_files(directory)) == (expected == "old"), phase
        assert reopened_content(directory, pool) == {"old": old, "new": new}[expected], phase


# ---- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def store_with_old(tmp_path):
    store = open_store(tmp_path, total_blocks=100)
    with random_handle(store.pool, "agent", 11, OLD_SEED) as handle:
        store.save(handle)
    return store


def fail_after(monkeypatch, n_bytes):
    """Make the file writer raise ENOSPC once ``n_bytes`` are written, like a disk that fills up."""
    real_write_all, left = file_format._write_all, [n_bytes]

    def write_all(fd, data, offset):
        size = memoryview(data).nbytes
        if size > left[0]:
            real_write_all(fd, memoryview(data).cast("B")[: left[0]], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= size
        real_write_all(fd, data, offset)

    monkeypatch.setattr(file_format, "_write_all", write_all)


@pytest.mark.parametrize("fails_after", [0, 1, 100, "data", "data+8"])
def test_a_disk_that_fills_up_mid_save_keeps_the_old_file(store_with_old, monkeypatch, fails_after):
    store = store_with_old
    old = loaded_snapshot(store, "agent")
    data_bytes = store.pool.spec.bytes_per_agent(11)
    fail_after(monkeypatch, {"data": data_bytes, "data+8": data_bytes + 8}.get(fails_after, fails_after))
    with random_handle(store.pool, "agent", 11, NEW_SEED) as new:
        with nothing_changes(store), pytest.raises(CacheWriteError, match="No space left on device.*unchanged"):
            store.save(new)
        assert temp_files(store.directory) == []
        assert loaded_snapshot(store, "agent") == old
        monkeypatch.undo()
        store.save(new)
        assert loaded_snapshot(store, "agent") == snapshot(new)


def test_an_eviction_that_cannot_write_keeps_the_agent_in_memory(store_with_old, monkeypatch):
    store = store_with_old
    with random_handle(store.pool, "agent", 11, NEW_SEED) as new:
        expected = snapshot(new)
        store.put(new.share())
    fail_after(monkeypatch, 0)
    with pytest.raises(CacheWriteError):
        store.evict("agent")
    with pytest.raises(CacheWriteError):
        store.close()
    assert store.resident == ("agent",)
    with store.get("agent") as current:
        assert snapshot(current) == expected
    monkeypatch.undo()
    store.close()
    assert store.resident == () and loaded_snapshot(store, "agent") == expected


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 2 MiB tmpfs (needs root); the injected-ENOSPC tests above cover machines without it."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_real_full_file_system_keeps_the_old_file(tiny_filesystem):
    spec = CRASH_SPEC.with_layers(4)  # 786 KiB per block of all layers
    store = open_store(tiny_filesystem / "cache", spec, total_blocks=20)
    with random_handle(store.pool, "agent", 200, OLD_SEED) as small:
        store.save(small)
        old = snapshot(small)
    with random_handle(store.pool, "agent", 400, NEW_SEED) as big:  # 1.5 MiB: does not fit beside the old one
        with nothing_changes(store), pytest.raises(CacheWriteError, match="No space left on device"):
            store.save(big)
        assert temp_files(store.directory) == []
        assert loaded_snapshot(store, "agent") == old
        store.delete("agent")
        store.save(big)
        assert loaded_snapshot(store, "agent") == snapshot(big)


# ---- two writers --------------------------------------------------------------------------------
TWO_WRITERS_CHILD = """
import sys
from test_persistence_support import CRASH_POOL_BLOCKS, CRASH_SPEC, CRASH_TOKENS, open_store, random_handle
store = open_store(sys.argv[1], CRASH_SPEC, CRASH_POOL_BLOCKS)
with random_handle(store.pool, "agent", CRASH_TOKENS, int(sys.argv[2])) as handle:
    for _ in range(15):
        store.save(handle)
"""


def test_two_processes_saving_one_agent_never_tear_its_file(tmp_path, contexts):
    """Two processes save their own context 15 times each while this one keeps loading: every load is
    one of the two, whole."""
    old_file, old, new = contexts
    directory = trial_directory(tmp_path, "shared", old_file)
    writers = [python_child(TWO_WRITERS_CHILD, directory, seed) for seed in (OLD_SEED, NEW_SEED)]
    reader = open_store(directory, CRASH_SPEC, CRASH_POOL_BLOCKS)
    loads = 0
    while any(w.poll() is None for w in writers):
        assert loaded_snapshot(reader, "agent") in (old, new)
        loads += 1
    assert [w.wait() for w in writers] == [0, 0]
    assert loaded_snapshot(reader, "agent") in (old, new)
    assert temp_files(directory) == []
    print(f"{loads} loads during the saves")


@pytest.fixture
def agent_lock_held_elsewhere(store_with_old):
    """Agent "agent"'s lock held through another open file, as another process would hold it."""
    with open(store_with_old.directory / ".agent.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield lock_file


def test_a_save_gives_up_with_a_typed_error_while_another_process_holds_the_lock(
        store_with_old, agent_lock_held_elsewhere):
    store = open_store(store_with_old.directory, lock_timeout=0.05)
    with random_handle(store.pool, "agent", 11, NEW_SEED) as new:
        with nothing_changes(store):
            for call in (store.save, lambda h: store.delete(h.agent_id)):
                with pytest.raises(CacheLockTimeoutError, match="another process holds the lock of agent 'agent'"):
                    call(new)
        fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
        store.save(new)
        assert loaded_snapshot(store, "agent") == snapshot(new)


def test_a_save_waits_for_the_lock_to_be_released(store_with_old, agent_lock_held_elsewhere):
    store = store_with_old
    release = threading.Timer(0.2, fcntl.flock, (agent_lock_held_elsewhere, fcntl.LOCK_UN))
    release.start()
    with random_handle(store.pool, "agent", 11, NEW_SEED) as new:
        store.save(new)
        assert loaded_snapshot(store, "agent") == snapshot(new)
    release.join()


class InThread(threading.Thread):
    """``call(*args)`` in a thread; ``outcome()`` joins it and returns the result or raises the error. With
    :func:`note_lock_waits`, ``waiting`` is set once the call waits for a lock another process holds."""

    def __init__(self, call, *args):
        super().__init__(daemon=True)
        self._call, self._args, self._outcome = call, args, None
        self.waiting = threading.Event()
        self.start()

    def run(self):
        try:
            self._outcome = (True, self._call(*self._args))
        except BaseException as exc:  # handed to outcome()
            self._outcome = (False, exc)

    def outcome(self):
        self.join(30)
        assert self._outcome is not None, "the call never returned"
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def note_lock_waits(store) -> None:
    """Make an ``InThread``'s ``waiting`` event tell when its call on ``store`` waits for an agent's lock."""
    real_wait = store._directory._wait

    def wait(seconds):
        getattr(threading.current_thread(), "waiting", threading.Event()).set()
        return real_wait(seconds)

    store._directory._wait = wait


def test_waiting_for_one_agents_lock_does_not_stop_calls_on_the_others(store_with_old, agent_lock_held_elsewhere):
    store = open_store(store_with_old.directory, lock_timeout=5)
    note_lock_waits(store)
    with random_handle(store.pool, "agent", 11, NEW_SEED) as new, \
            random_handle(store.pool, "other", 11, OLD_SEED) as other:
        saving = InThread(store.save, new)
        assert saving.waiting.wait(10)
        store.save(other)
        store.put(other.share())
        with store.get("other") as got:
            assert snapshot(got) == snapshot(other)
        assert store.evict("other") and store.delete("other") and store.list() == ["agent"]
        assert saving.is_alive()  # none of the calls above waited for it
        fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
        saving.outcome()
        assert loaded_snapshot(store, "agent") == snapshot(new)
    assert store.pool.used_blocks == 0
    store.pool.check_invariants()


def test_a_context_put_while_its_eviction_waits_for_the_lock_stays_current(store_with_old, agent_lock_held_elsewhere):
    store = open_store(store_with_old.directory, lock_timeout=5)
    store.put(random_handle(store.pool, "agent", 11, 3))
    note_lock_waits(store)
    evicting = InThread(store.evict, "agent")
    assert evicting.waiting.wait(10)
    new = random_handle(store.pool, "agent", 11, NEW_SEED)
    expected = snapshot(new)
    store.put(new)  # the store's context now: the eviction must neither drop it nor write the one before
    assert evicting.is_alive()
    fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
    assert evicting.outcome()
    assert store.resident == ("agent",)
    with store.get("agent") as got:
        assert snapshot(got) == expected
    store.close()
    assert loaded_snapshot(store, "agent") == expected
    assert store.pool.used_blocks == 0
    store.pool.check_invariants()


def test_a_get_that_waited_to_make_room_reads_what_was_saved_meanwhile(store_with_old, agent_lock_held_elsewhere):
    """Loading "other" must evict "agent", whose lock another process holds. While that waits, this process
    saves a new context of "other": the get returns that one, not the file it read before."""
    store = open_store(store_with_old.directory, total_blocks=23, lock_timeout=5)  # 8 blocks per context
    with random_handle(store.pool, "other", 11, OLD_SEED) as old:
        store.save(old)
    store.put(random_handle(store.pool, "agent", 11, 3))
    with random_handle(store.pool, "other", 11, NEW_SEED) as new:
        note_lock_waits(store)
        getting = InThread(store.get, "other")  # 7 blocks free: "agent" must go to disk first
        assert getting.waiting.wait(10)
        store.save(new)
        assert getting.is_alive()
        fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
        with getting.outcome() as got:
            assert snapshot(got) == snapshot(new)
    assert store.resident == ("other",)
    store.close()
    assert store.pool.used_blocks == 0
    store.pool.check_invariants()


def test_two_gets_of_one_agent_that_both_wait_to_make_room_both_return_it(store_with_old, agent_lock_held_elsewhere):
    """Both gets must evict "agent", whose lock another process holds. Once it is free, one loads "x"; the other
    must return that "x", not evict it to load a second copy (which failed: the first's share pins it)."""
    store = open_store(store_with_old.directory, total_blocks=23, lock_timeout=5)  # 8 blocks per context
    with random_handle(store.pool, "x", 11, OLD_SEED) as handle:
        store.save(handle)
        expected = snapshot(handle)
    store.put(random_handle(store.pool, "agent", 11, 3))
    with random_handle(store.pool, "pinned", 11, 4):  # held by the caller: 7 blocks left free
        note_lock_waits(store)
        getting = [InThread(store.get, "x"), InThread(store.get, "x")]
        assert all(thread.waiting.wait(10) for thread in getting)
        fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
        with getting[0].outcome() as first, getting[1].outcome() as second:
            assert snapshot(first) == snapshot(second) == expected
            assert first.all_block_ids == second.all_block_ids  # one copy in the pool
    store.close()
    assert store.pool.used_blocks == 0
    store.pool.check_invariants()


def test_making_room_after_a_wait_considers_the_agents_put_meanwhile(store_with_old, agent_lock_held_elsewhere):
    """The get must evict "agent", whose lock another process keeps past lock_timeout. Meanwhile "z" was put:
    evicting that instead makes the room. Before, the evictions went over the agents listed before the wait."""
    store = open_store(store_with_old.directory, total_blocks=31, lock_timeout=1)
    with random_handle(store.pool, "y", 11, OLD_SEED) as handle:
        store.save(handle)
        expected = snapshot(handle)
    store.put(random_handle(store.pool, "agent", 11, 3))
    z = random_handle(store.pool, "z", 11, NEW_SEED)
    z_context = snapshot(z)
    with random_handle(store.pool, "pinned", 11, 4):  # held by the caller: 7 blocks left free
        note_lock_waits(store)
        getting = InThread(store.get, "y")
        assert getting.waiting.wait(10)
        store.put(z)
        with getting.outcome() as got:
            assert snapshot(got) == expected
    assert set(store.resident) == {"agent", "y"} and loaded_snapshot(store, "z") == z_context
    fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
    store.close()
    assert store.pool.used_blocks == 0
    store.pool.check_invariants()


def test_a_flush_that_waited_does_not_write_back_an_agent_deleted_meanwhile(store_with_old, agent_lock_held_elsewhere):
    """Before, the flush took the deleted agent's lock with the context it listed before waiting: it waited
    for another process's save of that agent until lock_timeout, then raised for an agent the store no longer had."""
    store = open_store(store_with_old.directory, lock_timeout=5)
    store.put(random_handle(store.pool, "agent", 11, NEW_SEED))
    store.put(random_handle(store.pool, "b", 11, 3))
    note_lock_waits(store)
    flushing = InThread(store.flush)
    assert flushing.waiting.wait(10)
    assert store.delete("b")
    with open(store.directory / ".b.lock", "a") as b_lock:  # another process now saves its own "b"
        fcntl.flock(b_lock, fcntl.LOCK_EX)
        fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
        flushing.outcome()
    assert store.list() == ["agent"] and store.resident == ("agent",)
    store.close()
    assert store.pool.used_blocks == 0


def test_opening_a_store_removes_abandoned_temp_files_but_not_a_live_writers(store_with_old,
                                                                               agent_lock_held_elsewhere):
    directory = store_with_old.directory
    (directory / ".agent.0123456789ab.tmp").write_bytes(b"a live writer's half-written file")
    (directory / ".other.0123456789ab.tmp").write_bytes(b"abandoned by a killed process")
    open_store(directory)
    assert temp_files(directory) == [".agent.0123456789ab.tmp"]
    fcntl.flock(agent_lock_held_elsewhere, fcntl.LOCK_UN)
    open_store(directory)
    assert temp_files(directory) == []
