"""The agent cache file: every damage is a typed error that changes nothing, and MLX reads the file.

Each bad-file test goes through ``AgentCacheStore.load`` / ``get`` on a real file
and then checks that the pool, the store and every other file are unchanged.
"""

import errno
import io
import json
import os
import random
import re
import struct
import subprocess
import sys

import mlx.core as mx
import pytest

from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import (
    AgentCacheStore,
    CacheCorruptionError,
    CacheReadError,
    CacheWriteError,
    IncompatibleCacheFileError,
    InvalidAgentIdError,
    UnknownAgentError,
)
from semantic.persistence import directory as directory_module
from semantic.persistence import file_format
from test_persistence_support import (
    FINGERPRINT,
    nothing_changes,
    open_store,
    random_handle,
    snapshot,
    snapshot_of,
    temp_files,
)


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "cache")


@pytest.fixture
def saved(store):
    """Agent "a" (11 tokens: 3 blocks in full layers, 2 in the window layer) and a bystander "b", on disk."""
    for agent, n_tokens, seed in (("a", 11, 1), ("b", 5, 2)):
        with random_handle(store.pool, agent, n_tokens, seed) as handle:
            store.save(handle)
    return store.directory / "a.safetensors"


def header_length(path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def rewrite_metadata(path, **changes):
    """Change metadata fields and re-seal the header checksum, as a writer of that content would."""
    raw = path.read_bytes()
    end = header_length(path)
    header = json.loads(raw[8:end])
    header["__metadata__"].update(changes)
    header["__metadata__"]["header_checksum"] = file_format.header_checksum(header)
    path.write_bytes(file_format.encode_header(header) + raw[end:])


# ---- every single-bit flip, every truncation ---------------------------------------------------------
def test_every_single_bit_flip_of_a_small_file_is_detected(tmp_path):
    """All ~9,000 flips of a small file (a full-attention layer of 3 blocks, a window layer of 2): each is a
    CacheCorruptionError. No flip is harmless: the header JSON has no insignificant bytes (no whitespace
    inside it; a flipped padding space is not whitespace), and a changed header length breaks the exact
    file size check."""
    store = open_store(tmp_path, ModelCacheSpec(2, 1, 2, 2, "bfloat16", block_size=2, layer_windows=(None, 3)))
    with random_handle(store.pool, "a", 5, seed=1) as handle:
        store.save(handle)
    path = store.directory / "a.safetensors"
    original = path.read_bytes()
    undetected = []
    with nothing_changes(store, except_file=path.name), open(path, "r+b", buffering=0) as f:
        for position in range(len(original)):
            for bit in range(8):
                f.seek(position)
                f.write(bytes([original[position] ^ (1 << bit)]))
                try:
                    store.load("a").release()
                    undetected.append((position, bit))
                except CacheCorruptionError:
                    pass
            f.seek(position)
            f.write(original[position:position + 1])
    assert undetected == []
    assert len(original) - header_length(path) == 80  # the data region was covered too


def test_sampled_bit_flips_of_a_large_file_are_detected(tmp_path):
    """A smollm2-geometry context (30 layers x 2 blocks, 12 MB): flips at 1,000 random header positions,
    and at the first, last and 60 random data bytes (each of those loads reads and hashes all 12 MB)."""
    spec = ModelCacheSpec.preset("smollm2-135m")
    store = open_store(tmp_path, spec, total_blocks=130)
    with random_handle(store.pool, "big", 300, seed=3) as handle:
        store.save(handle)
    path = store.directory / "big.safetensors"
    original = path.read_bytes()
    data_start = header_length(path)
    rng = random.Random(0)
    positions = rng.sample(range(data_start), 1000) + [data_start, len(original) - 1]
    positions += rng.sample(range(data_start, len(original)), 60)
    with nothing_changes(store, except_file=path.name), open(path, "r+b", buffering=0) as f:
        for position in positions:
            f.seek(position)
            f.write(bytes([original[position] ^ (1 << rng.randrange(8))]))
            with pytest.raises(CacheCorruptionError):
                store.load("big")
            f.seek(position)
            f.write(original[position:position + 1])


def test_a_file_truncated_anywhere_is_detected(store, saved):
    with nothing_changes(store, except_file="a.safetensors"):
        for length in reversed(range(saved.stat().st_size)):
            os.truncate(saved, length)
            with pytest.raises(CacheCorruptionError, match="truncated|damaged|not JSON"):
                store.load("a")


def test_bytes_appended_to_a_file_are_detected(store, saved):
    saved.write_bytes(saved.read_bytes() + b"\0")
    with nothing_changes(store), pytest.raises(CacheCorruptionError, match="unexpected bytes at the end"):
        store.get("a")


def test_a_header_length_past_what_safetensors_reads_is_refused_before_it_is_read(store, saved, monkeypatch):
    """The length field was trusted up to the file's size: a sparse file claiming a header of gigabytes was read
    whole into memory (a bare MemoryError, or the process killed) before anything was checked."""
    claim = file_format.MAX_HEADER_BYTES + 1
    with open(saved, "wb") as file:
        file.write(struct.pack("<Q", claim))
        file.truncate(8 + claim)  # sparse: takes no disk
    requested = []
    real_read = file_format._read_exactly
    monkeypatch.setattr(file_format, "_read_exactly", lambda f, n, where: requested.append(n) or real_read(f, n, where))
    with nothing_changes(store), pytest.raises(CacheCorruptionError, match="over the 100000000 a header may take"):
        store.get("a")
    assert max(requested) == 8  # the length alone


def test_a_context_whose_header_safetensors_could_not_read_is_not_saved(store, saved, monkeypatch):
    before = saved.read_bytes()
    monkeypatch.setattr(file_format, "MAX_HEADER_BYTES", 100)  # under any agent's header
    with random_handle(store.pool, "a", 11, 3) as handle:
        with nothing_changes(store, except_file="a.safetensors"), \
                pytest.raises(CacheWriteError, match="nothing was written"):
            store.save(handle)
    assert saved.read_bytes() == before and not temp_files(store.directory)
    monkeypatch.undo()
    store.load("a").release()


# ---- files that are sound but not ours --------------------------------------------------------------
@pytest.mark.parametrize("header", [b"this is not json", b'{"__metadata__": {"format": ', b"\xff\xfe{}",
                                    b"[" * 100_000], ids=["text", "cut JSON", "not UTF-8", "deeply nested"])
def test_a_header_that_is_not_json_is_corruption(store, saved, header):
    saved.write_bytes(struct.pack("<Q", len(header)) + header)
    with nothing_changes(store), pytest.raises(CacheCorruptionError, match="not JSON"):
        store.get("a")


def test_a_header_field_nested_past_the_recursion_limit_is_corruption(store, saved):
    """A crafted file re-sealed with a valid (unkeyed) checksum: json.loads raised RecursionError."""
    rewrite_metadata(saved, geometry="[" * 100_000 + "]" * 100_000)
    with nothing_changes(store), pytest.raises(CacheCorruptionError, match="geometry"):
        store.get("a")


def replace_in_header(path, old: bytes, new: bytes) -> None:
    """Edit the header's JSON text (its length field follows; no checksum is re-sealed)."""
    raw, end = path.read_bytes(), header_length(path)
    header = raw[8:end].replace(old, new, 1)
    assert header != raw[8:end]
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[end:])


def test_a_header_holding_a_lone_surrogate_is_corruption(store, saved):
    """JSON's ``\\ud800`` parses, but the checksum's UTF-8 encoding raised UnicodeEncodeError."""
    replace_in_header(saved, b'"format":"semantic.agent_cache"', b'"format":"semantic.agent_cache","x":"\\ud800"')
    with nothing_changes(store), pytest.raises(CacheCorruptionError, match="cannot be encoded"):
        store.get("a")


def test_a_tensor_shape_nested_about_as_deep_as_python_allows_is_corruption(store, saved):
    """Nesting that json.loads accepts but json.dumps cannot encode again raised RecursionError; where that
    window lies depends on the stack, so every depth around the limit is tried."""
    original = saved.read_bytes()
    shape = re.search(rb'"shape":(\[[0-9,]*\])', original[:header_length(saved)]).group(1)
    with nothing_changes(store):
        for depth in range(sys.getrecursionlimit() - 60, sys.getrecursionlimit() + 20):
            saved.write_bytes(original)
            replace_in_header(saved, b'"shape":' + shape, b'"shape":' + b"[" * depth + b"]" * depth)
            with pytest.raises(CacheCorruptionError):
                store.get("a")
        saved.write_bytes(original)


def test_a_plain_safetensors_file_is_not_an_agent_cache(store, saved):
    mx.save_safetensors(str(saved), {"weight": mx.zeros((2, 2))}, metadata={"format": "mlx"})
    with nothing_changes(store), pytest.raises(IncompatibleCacheFileError, match="format 'mlx'.* not an agent cache"):
        store.get("a")


def test_a_file_of_another_format_version_is_incompatible(store, saved):
    rewrite_metadata(saved, format_version="2")
    with nothing_changes(store), pytest.raises(IncompatibleCacheFileError, match="format version '2'"):
        store.get("a")


def test_a_file_of_another_model_is_incompatible(store, saved):
    other_model = AgentCacheStore(store.directory, store.pool, "another-model:fedcba9876543210")
    with nothing_changes(store), pytest.raises(IncompatibleCacheFileError, match="written for model"):
        other_model.get("a")


def test_a_file_of_another_geometry_is_incompatible(store, saved):
    wider = ModelCacheSpec(3, 2, 8, 8, "bfloat16", block_size=4, layer_windows=(None, 6, None))
    other_pool = open_store(store.directory, wider)
    with nothing_changes(store), pytest.raises(IncompatibleCacheFileError, match="geometry"):
        other_pool.load("a")
    assert other_pool.pool.used_blocks == 0


def test_a_file_renamed_to_another_agent_is_detected(store, saved):
    (store.directory / "c.safetensors").write_bytes(saved.read_bytes())
    with nothing_changes(store), pytest.raises(CacheCorruptionError, match="holds agent 'a', not 'c'"):
        store.get("c")


def test_a_missing_agent_is_unknown(store, saved):
    with nothing_changes(store):
        with pytest.raises(UnknownAgentError, match="no cache file for agent 'zed'"):
            store.get("zed")
        with pytest.raises(UnknownAgentError):
            store.load("zed")


# ---- agent ids ------------------------------------------------------------------------------------
BAD_IDS = ["", "x\x00y", "\x00", "line\nbreak", "a" * 201, "é" * 34, "/" * 67, 123, None, b"bytes"]


@pytest.mark.parametrize("agent_id", BAD_IDS, ids=repr)
def test_agent_ids_that_cannot_name_a_file_are_rejected(store, saved, agent_id):
    calls = [store.get, store.load, store.delete, store.evict, lambda a: a in store]
    with nothing_changes(store):
        for call in calls:
            with pytest.raises(InvalidAgentIdError):
                call(agent_id)
    if isinstance(agent_id, str) and agent_id:  # the pool accepts any non-empty string; the store does not
        with random_handle(store.pool, agent_id, 5, seed=0) as handle:
            for call in (store.save, store.put):
                with nothing_changes(store), pytest.raises(InvalidAgentIdError):
                    call(handle)
    assert sorted(p.name for p in store.directory.parent.iterdir()) == ["cache"]


ODD_IDS = ["Alice", "alice", "ALICE", "agent é", "agent e\u0301", "100%", "%41", "a.b", ".hidden", "-", "x" * 200,
           "日本語", "tab\u00a0space", "COM1", "a:b",
           # paths and URLs: escaped like any other byte, so they name files inside the directory
           "team/alice", "https://example.com/agents/alice?turn=2", "../x", "../../etc/passwd", "/abs/path",
           "a\\b", ".", "..", "./x"]


def test_unusual_agent_ids_get_distinct_files_even_on_case_insensitive_file_systems(store):
    for seed, agent_id in enumerate(ODD_IDS):
        with random_handle(store.pool, agent_id, 5, seed) as handle:
            store.save(handle)
    names = [p.name for p in store.directory.glob("*.safetensors")]
    assert len({name.lower() for name in names}) == len(ODD_IDS)  # no two differ only in case
    assert all(name.isascii() and not name.startswith(".") for name in names)
    assert store.list() == sorted(ODD_IDS)
    for seed, agent_id in enumerate(ODD_IDS):
        with store.load(agent_id) as handle:
            assert handle.agent_id == agent_id
            assert snapshot(handle) == snapshot_of(store.pool, agent_id, 5, seed)
    assert all(p.is_file() for p in store.directory.iterdir())
    assert sorted(p.name for p in store.directory.parent.iterdir()) == ["cache"]  # nothing written outside
    assert store.delete("team/alice") and "team/alice" not in store.list()


def test_foreign_files_in_the_directory_are_ignored_by_list(store, saved):
    for name in ("notes.txt", "UPPER.safetensors", "%zz.safetensors", ".a.safetensors"):
        (store.directory / name).write_text("not ours")
    assert store.list() == ["a", "b"]


# ---- the file is a safetensors file -------------------------------------------------------------------
def test_mlx_reads_the_file_and_its_header(store, saved):
    arrays, metadata = mx.load(str(saved), return_metadata=True)
    with store.load("a") as handle:
        for layer, ids in enumerate(handle.all_block_ids):
            keys, values = store.pool.gather([ids])
            assert mx.array_equal(arrays[f"layers.{layer}.keys"], keys[0])
            assert mx.array_equal(arrays[f"layers.{layer}.values"], values[0])
        assert json.loads(metadata["token_ids"]) == list(handle.token_ids)
    assert metadata["format"] == "semantic.agent_cache" and metadata["format_version"] == "1"
    assert metadata["model_fingerprint"] == FINGERPRINT
    assert json.loads(metadata["layer_blocks"]) == [3, 2, 3]  # the window layer keeps only its blocks
    assert header_length(saved) % 8 == 0  # tensor data is aligned


def test_an_empty_context_round_trips(store):
    with random_handle(store.pool, "empty", 0, seed=0) as handle:
        store.save(handle)
    with store.load("empty") as loaded:
        assert loaded.num_tokens == 0 and loaded.num_blocks == 0


def test_the_same_context_gives_the_same_bytes(tmp_path):
    """Files are a function of the content: no timestamps, no random padding."""
    files = []
    for name in ("one", "two"):
        store = open_store(tmp_path / name)
        with random_handle(store.pool, "a", 9, seed=4) as handle:
            store.save(handle)
        files.append((store.directory / "a.safetensors").read_bytes())
    assert files[0] == files[1]


# ---- links, directories and read-only stores ---------------------------------------------------------
def test_a_planted_lock_symlink_cannot_make_save_write_outside_the_store(store, saved, tmp_path):
    outside = tmp_path / "outside"
    lock = store.directory / ".a.lock"
    lock.unlink()
    lock.symlink_to(outside)
    with random_handle(store.pool, "a", 7, seed=3) as handle:
        with nothing_changes(store), pytest.raises(CacheWriteError, match="symbolic link"):
            store.save(handle)
    assert not outside.exists()


def test_a_cache_file_that_is_a_symlink_or_a_directory_is_refused(store, saved, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(saved.read_bytes())
    (store.directory / "c.safetensors").symlink_to(elsewhere)
    (store.directory / "d.safetensors").mkdir()
    with nothing_changes(store):
        with pytest.raises(IncompatibleCacheFileError, match="symbolic link"):
            store.load("c")
        with pytest.raises(IncompatibleCacheFileError, match="not a regular file"):
            store.load("d")
        with pytest.raises(IncompatibleCacheFileError):
            store.get("d")
    os.mkfifo(store.directory / "e.safetensors")
    # `in` agrees with list(): it said True for these (and store.generate then failed every turn on them)
    assert sorted(store.list()) == ["a", "b"] and [agent in store for agent in "abcde"] == [True] * 2 + [False] * 3


@pytest.fixture
def read_only(tmp_path):
    """A read-only view of a directory (a read-only bind mount: root ignores permission bits)."""
    views = []

    def view(directory):
        mount_point = tmp_path / f"read-only-{len(views)}"
        mount_point.mkdir()
        if os.geteuid() != 0:
            os.chmod(directory, 0o555)
            os.rmdir(mount_point)
            mount_point.symlink_to(directory)
        else:
            for args in (["--bind", str(directory), str(mount_point)], ["-o", "remount,bind,ro", str(mount_point)]):
                mounted = subprocess.run(["mount", *args], capture_output=True, text=True)
                if mounted.returncode != 0:
                    pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.strip()}")
            views.append(mount_point)
        return mount_point

    yield view
    for mount_point in views:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_read_only_store_with_a_leftover_temp_file_opens_and_loads(store, saved, read_only):
    (store.directory / ".a.0123456789ab.tmp").write_bytes(b"half a save")
    expected = {agent: snapshot(store.load(agent)) for agent in ("a", "b")}
    view = read_only(store.directory)
    reader = open_store(view)
    assert reader.list() == ["a", "b"]
    assert {agent: snapshot(reader.load(agent)) for agent in ("a", "b")} == expected
    with random_handle(reader.pool, "a", 5, seed=9) as handle, pytest.raises(CacheWriteError):
        reader.save(handle)


# ---- I/O errors while reading ------------------------------------------------------------------------
def raise_eio(*args):
    raise OSError(errno.EIO, os.strerror(errno.EIO))


class FailingReads(io.FileIO):
    """A cache file whose ``failing``-th read (``read`` or ``readinto``, from 1; 0: none) raises EIO, and
    whose first close raises EIO (once closed) if ``close_fails``."""

    def __init__(self, *args, failing: int, close_fails: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.failing, self.reads, self.close_fails = failing, 0, close_fails

    def close(self):
        super().close()
        if self.close_fails:
            self.close_fails = False
            raise_eio()

    def _count(self) -> None:
        self.reads += 1
        if self.reads == self.failing:
            raise_eio()

    def read(self, *args):
        self._count()
        return super().read(*args)

    def readinto(self, buffer):
        self._count()
        return super().readinto(buffer)


def test_an_io_error_reading_a_file_is_a_read_error_that_leaves_it_as_it_is(store, saved, monkeypatch):
    """Before, an EIO reading the header came out as a bare OSError, and one reading the tensors (MLX reads them
    in mx.eval and reports a RuntimeError) as CacheCorruptionError: a file to throw away, though it reads later."""
    opened = []

    def open_failing(failing, close_fails=False):
        def opening(path, mode, buffering, opener):
            opened.append(FailingReads(os.fspath(path), mode, opener=opener, failing=failing,  # fspath: as open()
                                       close_fails=close_fails))
            return opened[-1]
        return opening

    with monkeypatch.context() as patch:
        patch.setattr(directory_module, "open", open_failing(0), raising=False)
        with store.load("a") as handle:
            expected = snapshot(handle)
    n_reads = opened[-1].reads
    assert n_reads > 2  # the length, the header, the tensors
    for failing in range(1, n_reads + 1):
        with monkeypatch.context() as patch, nothing_changes(store):
            patch.setattr(directory_module, "open", open_failing(failing), raising=False)
            with pytest.raises(CacheReadError, match=r"could not read .*a\.safetensors: Input/output error; the file "
                                                     r"was left as it is"):
                store.get("a")
    with monkeypatch.context() as patch, nothing_changes(store):
        patch.setattr(os, "fstat", raise_eio)
        with pytest.raises(CacheReadError, match="Input/output error"):
            store.get("a")
    with monkeypatch.context() as patch:
        patch.setattr(directory_module, "open", open_failing(0, close_fails=True), raising=False)
        with store.get("a") as handle:  # read and checked: an error closing the file loses nothing
            assert snapshot(handle) == expected


class CutShort(io.FileIO):
    """A cache file that ends ``missing`` bytes early once its size was read: cut in place while it is loaded."""

    def __init__(self, *args, missing: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.end = os.fstat(self.fileno()).st_size - missing

    def readinto(self, buffer):
        room = max(0, self.end - self.tell())
        return super().readinto(memoryview(buffer)[:room]) if room else 0


@pytest.mark.parametrize("missing", [1, 4096])
def test_a_file_cut_short_while_it_is_read_is_corrupt_and_changes_nothing(store, saved, monkeypatch, missing):
    def opening(path, mode, buffering, opener):
        return CutShort(os.fspath(path), mode, opener=opener, missing=missing)

    with monkeypatch.context() as patch, nothing_changes(store):
        patch.setattr(directory_module, "open", opening, raising=False)
        with pytest.raises(CacheCorruptionError, match="was cut short while it was read"):
            store.get("a")


# ---- the header's bytes ------------------------------------------------------------------------------
def test_a_changed_padding_byte_is_detected(store):
    for n_tokens in range(1, 40):  # a context whose header needs padding
        with random_handle(store.pool, "p", n_tokens, seed=n_tokens) as handle:
            store.save(handle)
        path = store.directory / "p.safetensors"
        raw = path.read_bytes()
        end = header_length(path)
        if raw[end - 1:end] == b" ":
            break
    else:
        raise AssertionError("no header with padding")
    for replacement in (b"\n", b"\t", b"\r"):  # still valid JSON whitespace
        path.write_bytes(raw[: end - 1] + replacement + raw[end:])
        with nothing_changes(store), pytest.raises(CacheCorruptionError, match="canonical"):
            store.load("p")
