"""The on-disk agent cache store: save and load throughput against plain file I/O of the same bytes in
the same directory, and time to first token of an agent whose context is loaded from disk.

Files live in one fixed scratch directory (``$TMPDIR/semantic-bench-persistence``), rewritten on every
run; loads read what was just written, so they come from the page cache, like the plain reads they
are compared with. A commit without ``semantic.persistence`` skips these benchmarks.
"""

import functools
import os
import pathlib
import tempfile
import time

import numpy as np

from .common import DEFAULT_TTFT, ENGINE_DTYPE, ENGINE_MODELS, cases, engine, median_of_runs, require_selected

FINGERPRINT = "random contexts, no model"
SCRATCH = pathlib.Path(tempfile.gettempdir()) / "semantic-bench-persistence"


def persistence():
    try:
        import semantic.persistence
    except ImportError as exc:
        raise NotImplementedError(f"this commit has no agent cache store: {exc}") from exc
    return semantic.persistence


# ---- throughput ---------------------------------------------------------------------------------
THROUGHPUT_CASES = {
    # name -> (geometry, blocks, layers)
    "smollm2-135m 2K tokens": ("smollm2-135m", 8, 30),
    "gemma3-12b-sliding 2K tokens x 12 layers": ("gemma3-12b-sliding", 8, 12),
}


@functools.lru_cache(maxsize=1)
def saved_context(case: str):
    """A context of the case (with room in its pool for a loaded copy), its store, and its file (memoised)."""
    geometry, blocks, layers = THROUGHPUT_CASES[case]
    ctx = cases.context(geometry, blocks, layers, spare_blocks=blocks)
    store = persistence().AgentCacheStore(SCRATCH / "throughput", ctx.pool, FINGERPRINT)
    store.save(ctx.handle)
    return ctx, store, store.directory / f"{ctx.handle.agent_id}.safetensors"


def plain_write(path: pathlib.Path, data: np.ndarray) -> None:
    """The baseline of a save: the same bytes written sequentially and fsynced, nothing else."""
    with open(path, "wb", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())


def plain_read(path: pathlib.Path, buffer: np.ndarray) -> None:
    """The baseline of a load: the file read sequentially into a buffer allocated beforehand."""
    with open(path, "rb", buffering=0) as f:
        f.readinto(buffer)


class SaveLoadThroughput:
    """GB/s of ``AgentCacheStore.save`` (gather the blocks, hash, write, fsync, rename, fsync the directory)
    and ``load`` (read, verify every checksum, allocate and write pool blocks) over the file's size; the
    ``plain_*`` baselines move the same bytes to and from a file in the same directory. Medians of 5 calls."""

    version = 1
    params = list(THROUGHPUT_CASES)
    param_names = ("case",)
    timeout = 300

    def setup(self, case):
        self.ctx, self.store, self.file = saved_context(case)
        self.nbytes = self.file.stat().st_size
        cases.buffer_cache_for(self.nbytes)

    def gbps(self, fn) -> float:
        return self.nbytes / float(np.median(cases.time_samples(fn, repeat=5, warmup=2))) / 1e9

    def track_save(self, case):
        return self.gbps(lambda: self.store.save(self.ctx.handle))

    track_save.unit = "GB/s"

    def track_plain_write(self, case):
        data = np.frombuffer(self.file.read_bytes(), dtype=np.uint8)
        return self.gbps(lambda: plain_write(self.file.with_name("plain-write.bin"), data))

    track_plain_write.unit = "GB/s"

    def track_load(self, case):
        return self.gbps(lambda: self.store.load(self.ctx.handle.agent_id))  # time_samples releases it

    track_load.unit = "GB/s"

    def track_plain_read(self, case):
        buffer = np.empty(self.nbytes, dtype=np.uint8)
        return self.gbps(lambda: plain_read(self.file, buffer))

    track_plain_read.unit = "GB/s"


# ---- time to first token ------------------------------------------------------------------------
FROM_DISK_TOKENS = (1024, 2048)
STORED_AGENT = "stored"  # the agent id of cases.stored_context
DEFAULT_FROM_DISK = (
    {point for point in DEFAULT_TTFT if point[1] in FROM_DISK_TOKENS}
    | {("smollm2-135m", n) for n in FROM_DISK_TOKENS}  # no prefill of the context: fast on smollm2 too
)


@functools.lru_cache(maxsize=1)
def store_with_context(model: str, context_tokens: int):
    """The engine's store, holding on disk the memoised stored context of ``context_tokens`` (memoised)."""
    eng = engine(model)
    store = persistence().AgentCacheStore.for_engine(SCRATCH / "engine", eng)
    store.save(cases.stored_context(model, context_tokens, ENGINE_DTYPE))
    return store


class TimeToFirstTokenFromDisk:
    """Seconds from "the agent's context of ``context_tokens`` is only on disk" to its first new token:
    ``store.load`` (read, verify, write into pool blocks), then one new token submitted with the loaded
    context. Compare with ``bench_engine.TimeToFirstToken`` at the same points: ``track_cold`` prefills
    the whole context, ``track_warm`` starts from blocks already in the pool."""

    version = 1
    params = (list(ENGINE_MODELS), list(FROM_DISK_TOKENS))
    param_names = ("model", "context_tokens")
    timeout = 600

    def setup(self, model, context_tokens):
        persistence()
        require_selected((model, context_tokens), DEFAULT_FROM_DISK, "model and context")
        self.engine = engine(model)
        self.store = store_with_context(model, context_tokens)
        self.new_token = cases.prompt_tokens(self.engine, 1, seed=1)

    def load_then_first_token(self) -> float:
        start = time.perf_counter()
        with self.store.load(STORED_AGENT) as loaded:
            loading = time.perf_counter() - start
            return loading + cases.time_to_first_token(self.engine, self.new_token, cache=loaded)

    def track_from_disk(self, model, context_tokens):
        return median_of_runs(self.load_then_first_token, 9, 10.0)

    track_from_disk.unit = "seconds"
