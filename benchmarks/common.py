"""What the benchmark modules share: the cases, which of them run by default, and explicit skips.

Every case (geometries, the blocks x layers grid, memoised builders) is defined once, in
``semantic/benchmarking/cases.py``, which the EXP-006 runner uses too. This module adds only
what is asv's business. A benchmark that does not run raises ``NotImplementedError`` in setup,
so asv records it as skipped (n/a on the dashboard) and prints the reason; nothing is dropped
silently:

* points outside the default selection run with ``SEMANTIC_BENCH_FULL=1``;
* cases needing more memory than this machine has are skipped;
* features a commit does not have yet (``ImportError``) are skipped on that commit;
* real models whose weights this machine cannot fetch (no package index) are skipped there.
"""

from __future__ import annotations

import abc
import importlib.util
import os
import pathlib
import statistics
import sys
import time

import semantic  # noqa: F401  (first: on a Linux CPU it loads OpenBLAS, which must precede mlx.core)
import mlx.core as mx  # noqa: E402

FULL = os.environ.get("SEMANTIC_BENCH_FULL", "0") not in ("", "0")

MEMORY_SHARE = 0.8
"""Cases needing more than this share of the machine's memory are skipped."""


def _load_cases():
    # asv installs the commit it measures but takes the benchmarks from this checkout. Loading this
    # checkout's cases.py (not the installed copy) keeps the harness the same for every commit, so a
    # change in a result is a change in the code measured, and commits older than cases.py run too.
    path = pathlib.Path(__file__).resolve().parent.parent / "semantic" / "benchmarking" / "cases.py"
    spec = importlib.util.spec_from_file_location("semantic_benchmark_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


cases = _load_cases()

DEFAULT_GRID = (
    *((c.geometry, c.blocks, c.layers) for c in cases.TARGET_CASES if c.geometry == "smollm2-135m"),
    # One point per gemma3 geometry, 8 blocks so the sliding layers' 4-block windows slide; the
    # 32 x 48 target copies 3 GiB per call and runs with SEMANTIC_BENCH_FULL=1.
    ("gemma3-12b-full", 4, 12),
    ("gemma3-12b-sliding", 8, 12),
)
"""(geometry, blocks, layers) points of the copy benchmarks that run without SEMANTIC_BENCH_FULL."""

FULL_GRID = tuple((g, b, n) for g in cases.GEOMETRIES for b in cases.BLOCKS for n in cases.LAYERS)


def copy_case(geometry: str, blocks: int, layers: int) -> str:
    return f"{geometry} {blocks}x{layers}"


COPY_CASES = {copy_case(*point): point for point in (FULL_GRID if FULL else DEFAULT_GRID)}
"""The copy benchmarks' one parameter, ``case`` ("smollm2-135m 8x30": geometry, blocks x layers) ->
its point. One listed parameter rather than a blocks x layers x geometry product: asv starts a
process for every point of a product, and all but a few of the 72 would only skip."""

REAL_MODEL = "smollm2-135m-instruct"
"""The real SmolLM2-135M-Instruct (``semantic.models``, fetched from PyPI once per machine)."""
ENGINE_MODELS = ("tiny-llama", "smollm2-135m", REAL_MODEL)
ENGINE_DTYPE = "bfloat16"
DEFAULT_TTFT = frozenset(("tiny-llama", n) for n in cases.ENGINE_TOKENS) | {(REAL_MODEL, 256)}
"""(model, context tokens) points of the time-to-first-token benchmarks that run by default. A cold
prefill on the random-weight smollm2-135m preset (bf16) takes ~35 s at 256 tokens and ~10 min at 2K on
a CPU; the real model computes in float32 through OpenBLAS there, several times faster, yet its 1K and 2K
points still take minutes: they run with SEMANTIC_BENCH_FULL=1."""
DEFAULT_ROUND_TRIP = DEFAULT_TTFT | {("smollm2-135m", 256)}
"""The engine round trip resumes a stored context (no prefill), so smollm2-135m fits at 256 tokens."""


def require_selected(point, default_points, what: str) -> None:
    if not FULL and point not in default_points:
        raise NotImplementedError(f"{what} {point} runs with SEMANTIC_BENCH_FULL=1")


def require_memory(nbytes: int) -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > MEMORY_SHARE * total:
        raise NotImplementedError(
            f"needs ~{nbytes / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of this machine's {total / 2**30:.0f} GiB"
        )


def forget_setup_peak() -> None:
    """Make the process's current memory its peak, which is what asv's ``peakmem_`` reports, so the
    peak that building a context reached does not hide the operation's. Called inside ``peakmem_``
    methods (untimed): MLX's cached buffers are returned first, so the operation allocates afresh.
    Linux only (``/proc/self/clear_refs``); elsewhere the peak includes setup's."""
    mx.clear_cache()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size
    except OSError:
        pass


def median_of_runs(fn, max_runs: int, budget_s: float) -> float:
    """Median of ``fn()`` over up to ``max_runs`` runs, stopping once ``budget_s`` seconds have passed
    (at least one run): a cold prefill may take minutes."""
    values, start = [], time.perf_counter()
    while len(values) < max_runs and (not values or time.perf_counter() - start < budget_s):
        values.append(fn())
    return statistics.median(values)


def engine(model: str):
    """The memoised engine on a local model, or a skip on commits without what it needs and on machines
    that cannot fetch a real model's weights (a host without a package index, such as the GPU reference
    machine): there the point is n/a with pip's reason, not a failure blamed on the commit."""
    try:
        return cases.engine(model, ENGINE_DTYPE)
    except ImportError as exc:
        raise NotImplementedError(f"this commit cannot run the engine benchmarks: {exc}") from exc
    except _wheels_unavailable_errors() as exc:
        reason = str(exc).splitlines()[0][:300]
        raise NotImplementedError(f"{model}'s weights cannot be fetched on this machine: {reason}") from exc


def _wheels_unavailable_errors() -> tuple:
    """``semantic.models.ModelWheelsUnavailableError`` where the measured commit has it. Other fetch errors
    (a changed package, a full disk, a broken fetch) stay failures."""
    try:
        from semantic.models import ModelWheelsUnavailableError
    except ImportError:
        return ()
    return (ModelWheelsUnavailableError,)


class CopyBenchmark(abc.ABC):
    """A block <-> cache copy of one case (geometry, blocks x layers), 256-token blocks, bf16.

    Subclasses give ``operation`` and name their own ``time_``/``peakmem_`` methods (asv keys
    results by name), which call :meth:`measure` / :meth:`measure_peak`. ``peakmem_<operation>``
    minus ``peakmem_reference`` is the memory the operation adds to what setup left resident.
    """

    params = (list(COPY_CASES),)
    param_names = ("case",)
    version = 1  # results are kept in benchmarks/results: bump only when what is measured changes
    timeout = 900  # the full grid's 32 x 48 gemma3 cases first-touch ~10 GiB, slow on a VM
    spare_blocks = False  # whether the pool needs room for a second copy of the context
    copies = 1  # context-sized copies one call makes
    resident_copies = 3  # context-sized buffers alive at once: pool, source caches, output
    result = None  # asv calls teardown after a skipped setup too

    def setup(self, case):
        geometry, blocks, layers = COPY_CASES[case]
        spec = cases.spec_for(geometry, layers)
        context_bytes = spec.bytes_per_agent(blocks * spec.block_size)
        require_memory((self.resident_copies + 2 * self.copies) * context_bytes)  # + memcpy's pair
        # No cases.buffer_cache_for: BlockPool sizes MLX's buffer cache itself, and on commits before
        # it did, the page faults of every rebuild are what that commit cost.
        self.ctx = cases.context(geometry, blocks, layers, blocks if self.spare_blocks else 0)

    def teardown(self, *params):
        # Free the sample's output before the next one: stored blocks go back to the pool, rebuilt
        # caches to MLX's buffer cache, where the next call finds them.
        release = getattr(self.result, "release", None)
        if release is not None:
            release()
        self.result = None

    @abc.abstractmethod
    def operation(self):
        """One call of what is measured; returns what it produced."""

    def measure(self) -> None:
        self.result = self.operation()
        cases.evaluate(self.result)

    def measure_peak(self) -> None:
        forget_setup_peak()
        self.measure()

    def throughput(self):
        return cases.throughput(self.operation, self.copies * self.ctx.nbytes, repeat=5)

    def track_gbps(self, *params):
        """Bytes copied per second (median of 5 calls after 3 warm-up calls)."""
        return self.throughput()[0]

    track_gbps.unit = "GB/s"

    def track_memcpy_ratio(self, *params):
        """A plain copy's time for the same bytes (memcpy on CPU, an MLX copy kernel on a GPU),
        measured in the same process, over the operation's: 1.0 means as fast as a plain copy."""
        return self.throughput()[2]

    track_memcpy_ratio.unit = "ratio"

    def track_over_copy(self, *params):
        """The operation's time over a plain copy's of the same bytes (medians of 20 calls each, same
        process, synchronised on a GPU): lower is better, 1.0 is copy speed. Unlike
        ``track_memcpy_ratio`` (its inverse, higher is better), ``make bench-compare`` judges it."""
        return 1 / cases.throughput(self.operation, self.copies * self.ctx.nbytes, repeat=20)[2]

    track_over_copy.unit = "x copy"

    def peakmem_reference(self, *params):
        """What setup left resident."""
        forget_setup_peak()
