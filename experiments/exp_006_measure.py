"""EXP-006 measurements: each section of the plan as a function returning a JSON-ready dict.

Every case and builder comes from :mod:`semantic.benchmarking.cases` (shared with the asv
suite); every timed region is ``cases.time_samples``: it ends with ``mx.eval`` of what the
call produced, and with ``mx.synchronize()`` on GPU.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx_lm

from experiments.stats import fit_line, summarize
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.application.block_cache import cache_to_blocks
from semantic.benchmarking import cases
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec

REPO = Path(__file__).resolve().parents[1]

GPU_TTFT_TOKENS = cases.ENGINE_TOKENS + (4096, 8192)
"""Prompt lengths of the time-to-first-token comparison on GPU (the plan's "up to 8K");
on CPU, ``cases.ENGINE_TOKENS`` (prefilling 2K tokens already takes minutes there)."""

TTFT_NEW_TOKENS = 16
"""The new turn of a resumed agent: its prompt of N tokens is N - 16 cached ones plus these."""

PLAN_POOL_BLOCKS = 500  # the plan's BlockPool(total_blocks=500)
PLAN_PROMPT = "Long prompt..." * 50  # the plan's benchmark 1 prompt, verbatim
PLAN_MAX_TOKENS = 100

LINEAR_R2 = 0.98
"""The plan asks for linear scaling; a fit whose R² is below this bends visibly off a line."""

LEAK_TOLERANCE_BYTES = 1 << 20
"""Active-memory growth allowed over the leak check's round trips (allocator rounding, index arrays)."""

WRITE_MEMORY_FACTOR = 5
READ_MEMORY_FACTOR = 4
"""Peak memory of a case in units of its context's bytes: pool, source caches, a rebuilt copy and the
one MLX keeps cached for reuse; measuring extraction doubles the pool."""


class ExperimentError(Exception):
    """A run that cannot start or go on (unknown device, unloadable model, pool too small): exit code 2."""


@dataclass(frozen=True)
class Settings:
    device: str
    warmup: int = 10
    iterations: int = 100
    min_iterations: int = 10
    budget_s: Optional[float] = None
    blocks: Tuple[int, ...] = cases.BLOCKS
    layers: Tuple[int, ...] = cases.LAYERS
    geometries: Tuple[str, ...] = tuple(cases.GEOMETRIES)
    write_geometries: Tuple[str, ...] = tuple(cases.GEOMETRIES)
    ttft_tokens: Tuple[int, ...] = cases.ENGINE_TOKENS
    ttft_repeats: int = 3
    ttft_warmup: int = 1
    leak_round_trips: int = 1000
    pool_blocks: Optional[int] = None
    quick: bool = False

    @property
    def sync(self) -> bool:
        return self.device == "gpu"  # GPU work is asynchronous: the clock must wait for it

    def as_dict(self) -> dict:
        return {name: (list(v) if isinstance(v, tuple) else v) for name, v in vars(self).items()}


# ---- timing -------------------------------------------------------------------------------------
def measure(fn: Callable[..., object], settings: Settings, setup: Optional[Callable[[], object]] = None) -> dict:
    """The plan's method: ``warmup`` calls, then ``iterations`` timed calls.

    With ``budget_s``, two warm-up calls time the case first (the first may compile kernels);
    then the timed calls fall to what fits the budget, never below ``min_iterations``, and the
    remaining warm-ups to a fifth of it. ``trimmed`` says when that happened.
    """
    if settings.budget_s is None:
        warmup, iterations = settings.warmup, settings.iterations
        samples = cases.time_samples(fn, iterations, warmup, settings.sync, setup)
    else:
        (per_call,) = cases.time_samples(fn, 1, 1, settings.sync, setup)
        affordable = int(settings.budget_s / max(per_call, 1e-9))
        iterations = min(settings.iterations, max(settings.min_iterations, affordable))
        extra_warmup = min(max(settings.warmup - 2, 0), affordable // 5)
        samples = cases.time_samples(fn, iterations, extra_warmup, settings.sync, setup)
        warmup = extra_warmup + 2
    samples_ms = [s * 1e3 for s in samples]
    return {
        "warmup": warmup,
        "iterations": len(samples_ms),
        "trimmed": len(samples_ms) < settings.iterations or warmup < settings.warmup,
        "stats_ms": summarize(samples_ms),
        "samples_ms": [round(s, 6) for s in samples_ms],
    }


def p50(measurement: dict) -> float:
    return measurement["stats_ms"]["p50"]


def p95(measurement: dict) -> float:
    return measurement["stats_ms"]["p95"]


# ---- the machine ------------------------------------------------------------------------------------
def select_device(name: Optional[str]) -> str:
    """Make ``name`` (``cpu``, ``gpu``, or ``None`` for MLX's default) the default device; returns it."""
    if name is None:
        name = "gpu" if mx.is_available(mx.gpu) else "cpu"
    if name not in ("cpu", "gpu"):
        raise ExperimentError(f"unknown device {name!r}; choose cpu or gpu")
    if name == "gpu" and not mx.is_available(mx.gpu):
        raise ExperimentError(
            "--device gpu: this MLX build has no GPU backend (mx.is_available(mx.gpu) is False); "
            "install MLX with Metal (macOS) or CUDA (pip install 'mlx[cuda13]'), or run with --device cpu"
        )
    mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)
    return name


def cache_limit() -> int:
    """MLX's buffer-cache limit now in force. MLX has no getter: raise it (which frees nothing), read the
    previous value, put it back."""
    limit = mx.set_cache_limit(1 << 62)
    mx.set_cache_limit(limit)
    return limit


def available_memory(device: str) -> Optional[int]:
    """Bytes a case may still take: the OS's MemAvailable on a Linux CPU run, else the device's memory
    less what MLX holds; ``None`` if neither is known. MLX's cached buffers count as available."""
    meminfo = Path("/proc/meminfo")
    if device == "cpu" and meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024 + mx.get_cache_memory()
    size = mx.device_info().get("memory_size")
    return None if size is None else int(size) - mx.get_active_memory()


def environment(device: str, git_commit: Optional[str] = None) -> dict:
    """The machine, versions and checkout; ``git_commit`` names the commit of a checkout copied without
    its ``.git`` (as on a remote GPU machine)."""
    info = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in mx.device_info().items()}
    commit, dirty = (git_commit, None) if git_commit else _git_state()
    return {
        "device": device,
        "device_name": str(info.get("device_name") or _cpu_name()) if device == "gpu" else _cpu_name(),
        "cpu_name": _cpu_name(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _total_memory(),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "mlx_device_info": info,
        "mlx_cache_limit_bytes_at_start": cache_limit(),
        "nice": os.nice(0),
        "load_average_start": list(os.getloadavg()),
    }


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _total_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git_state() -> Tuple[str, Optional[bool]]:
    """(commit, uncommitted changes?) of the checkout; ``("unknown", None)`` outside one.
    ``--no-optional-locks``: reading the state must not rewrite the index."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


# ---- the grid: reconstruction, extraction, round trip, copy baselines ---------------------------------
def grid(settings: Settings) -> List[Tuple[str, int, int]]:
    return [(g, b, n) for g in settings.geometries for n in settings.layers for b in settings.blocks]


def measure_case(geometry: str, blocks: int, layers: int, settings: Settings) -> dict:
    spec = cases.spec_for(geometry, layers)
    n_tokens = blocks * spec.block_size
    nbytes = spec.bytes_per_agent(n_tokens)
    writes = geometry in settings.write_geometries
    record = {
        "geometry": geometry, "blocks": blocks, "layers": layers, "tokens": n_tokens,
        "block_layers": blocks * layers, "blocks_moved": spec.blocks_per_agent(n_tokens), "nbytes": nbytes,
        "skipped": None,
    }
    need = (WRITE_MEMORY_FACTOR if writes else READ_MEMORY_FACTOR) * nbytes
    available = available_memory(settings.device)
    if available is not None and need > available:
        record["skipped"] = f"needs about {need / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB available"
        return record
    record["baseline_kind"] = device_baseline(settings.device)
    record["baseline"] = copy_baseline(nbytes, settings)  # first: its buffers are gone before the pool comes
    spare = -(-spec.blocks_per_agent(n_tokens) // layers) if writes else 0
    ctx = cases.context(geometry, blocks, layers, spare)
    try:
        _drop_build_garbage()
        record["mlx_cache_limit_bytes"] = cache_limit()
        ops = {"reconstruct": measure(lambda: cases.reconstruct(ctx), settings)}
        if writes:
            ops["extract"] = measure(lambda: cases.extract(ctx), settings)
            ops["round_trip"] = measure(lambda: cases.round_trip(ctx), settings)
    finally:
        del ctx
        cases.context.cache_clear()  # one case's pool in memory at a time
        mx.clear_cache()
    record["ops"] = ops
    record["bandwidth"] = {
        # bytes of the context / p50 time: each byte is read once and written once
        "reconstruct_gbps": nbytes / p50(ops["reconstruct"]) / 1e6,
        "baseline_gbps": nbytes / p50(record["baseline"]) / 1e6,
        "ratio": p50(record["baseline"]) / p50(ops["reconstruct"]),  # 1.0: the rebuild runs at copy speed
    }
    return record


def device_baseline(device: str) -> str:
    """The copy a rebuild is compared with: host memcpy on CPU; on GPU, where memcpy would measure the
    host's memory, an MLX copy kernel in GPU memory."""
    return "device_copy" if device == "gpu" else "memcpy"


def copy_baseline(nbytes: int, settings: Settings) -> dict:
    """The device's copy of the same bytes, timed like the rebuild."""
    if device_baseline(settings.device) == "memcpy":
        src, dst = cases.memcpy_source(nbytes)
        return measure(lambda: cases.memcpy(src, dst), settings)
    source = cases.device_copy_source(nbytes)
    return measure(lambda: cases.device_copy(source), settings)


def _drop_build_garbage() -> None:
    """Empty MLX's buffer cache after building a context. MLX recycles a freed buffer only while the
    cache is under its limit, so the build's leftovers (random data, padding) would keep the rebuild's
    own buffers from being recycled: every call would page-fault fresh memory (seen: 10x slower)."""
    mx.clear_cache()


# ---- judging ------------------------------------------------------------------------------------------
def judge(case: cases.TargetCase, op: str, target_ms: float, records: Sequence[dict]) -> dict:
    """PASS / FAIL of ``op``'s p95 in ``case`` against ``target_ms``; NOT RUN when not measured."""
    entry = {"name": case.name, "geometry": case.geometry, "blocks": case.blocks, "layers": case.layers,
             "tokens": case.blocks * cases.spec_for(case.geometry, case.layers).block_size,
             "op": op, "target_ms": target_ms, "p95_ms": None, "status": "NOT RUN", "reason": None}
    record = next((r for r in records
                   if (r["geometry"], r["blocks"], r["layers"]) == (case.geometry, case.blocks, case.layers)), None)
    measurement = (record or {}).get("ops", {}).get(op)
    if record is None:
        entry["reason"] = "not in this run's grid"
    elif record["skipped"]:
        entry["reason"] = record["skipped"]
    elif measurement is None:
        entry["reason"] = f"{op} is measured for --write-geometries only, which leave out {case.geometry}"
    if measurement is None:
        return entry
    entry.update(p95_ms=p95(measurement), iterations=measurement["iterations"], nbytes=record["nbytes"],
                 status="PASS" if p95(measurement) < target_ms else "FAIL")
    return entry


def targets(records: Sequence[dict]) -> List[dict]:
    out = [judge(case, "reconstruct", case.target_ms, records) for case in cases.TARGET_CASES]
    stretch = out[-1]  # the plan's nice-to-have applies to its largest case
    stretch["nice_to_have_ms"] = cases.NICE_TO_HAVE_MS
    if stretch["p95_ms"] is not None:
        stretch["nice_to_have_status"] = "PASS" if stretch["p95_ms"] < cases.NICE_TO_HAVE_MS else "FAIL"
    return out


def extraction_targets(records: Sequence[dict]) -> List[dict]:
    return [judge(case, "extract", case.target_ms, records) for case in cases.EXTRACTION_CASES]


def round_trip_target(records: Sequence[dict]) -> dict:
    case = cases.ROUND_TRIP_CASE
    return judge(case, "round_trip", 2 * case.target_ms, records)


def scaling(records: Sequence[dict]) -> dict:
    """Least-squares lines of p50 reconstruction latency against the blocks copied (blocks x layers for
    full attention), one per geometry, and against bytes over all geometries."""
    measured = [r for r in records if r.get("ops")]
    per_geometry = {}
    for geometry in dict.fromkeys(r["geometry"] for r in measured):
        points = [r for r in measured if r["geometry"] == geometry]
        if len({r["blocks_moved"] for r in points}) >= 2:
            fit = fit_line([r["blocks_moved"] for r in points], [p50(r["ops"]["reconstruct"]) for r in points])
            per_geometry[geometry] = {**fit.as_dict(), "us_per_block": fit.slope * 1e3}
    by_bytes = None
    if len({r["nbytes"] for r in measured}) >= 2:
        fit = fit_line([r["nbytes"] for r in measured], [p50(r["ops"]["reconstruct"]) for r in measured])
        by_bytes = {**fit.as_dict(), "gbps": 1e-6 / fit.slope if fit.slope > 0 else None}
    fits = list(per_geometry.values()) + ([by_bytes] if by_bytes else [])
    return {
        "latency": "p50 of reconstruction, ms",
        "per_geometry": per_geometry,
        "bytes": by_bytes,
        "r2_threshold": LINEAR_R2,
        "status": "NOT RUN" if not fits else "PASS" if all(f["r2"] >= LINEAR_R2 for f in fits) else "FAIL",
    }


# ---- padded vs blocks ---------------------------------------------------------------------------------
def padded_geometries(settings: Settings) -> List[str]:
    """The run's full-attention geometries: a padded store has no sliding windows."""
    return [g for g in settings.geometries if not cases.spec_for(g, 1).sliding_window_layers]


def padded_comparison(geometry: str, settings: Settings) -> dict:
    ctx = cases.padded_context(geometry)
    try:
        _drop_build_garbage()
        padded = measure(lambda: cases.padded_reconstruct(ctx), settings)
        blocks = measure(lambda: cases.reconstruct(ctx), settings)
        record = {
            "geometry": geometry, "layers": ctx.spec.n_layers, "tokens": cases.PADDED_TOKENS,
            "padded_slots": int(ctx.caches[0].keys.shape[2]), "blocks": ctx.spec.blocks_for_tokens(cases.PADDED_TOKENS),
            "nbytes": ctx.nbytes, "padded": padded, "block_based": blocks,
            "block_based_faster_by": p50(padded) / p50(blocks) - 1,
        }
    finally:
        del ctx
        cases.padded_context.cache_clear()
        mx.clear_cache()
    return record


# ---- leaks --------------------------------------------------------------------------------------------
def leak_check(settings: Settings) -> dict:
    """Free blocks and MLX active memory before and after ``leak_round_trips`` rebuild-store-release cycles."""
    case = cases.TARGET_CASES[0]  # the smallest case: 1,000 cycles of it take seconds, not minutes
    ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
    try:
        def cycles(n: int) -> None:
            for _ in range(n):
                cases.round_trip(ctx).release()

        cycles(3)  # buffers of the steady state exist before the baseline is read
        free_before, active_before = _pool_and_memory(ctx.pool)
        cycles(settings.leak_round_trips)
        free_after, active_after = _pool_and_memory(ctx.pool)
        ctx.pool.check_invariants()
        growth = active_after - active_before
        return {
            "case": case.name, "geometry": case.geometry, "round_trips": settings.leak_round_trips,
            "pool_total_blocks": ctx.pool.total_blocks,
            "free_blocks_before": free_before, "free_blocks_after": free_after,
            "active_bytes_before": active_before, "active_bytes_after": active_after,
            "tolerance_bytes": LEAK_TOLERANCE_BYTES,
            "status": "PASS" if free_after == free_before and growth <= LEAK_TOLERANCE_BYTES else "FAIL",
        }
    finally:
        del ctx
        cases.context.cache_clear()
        mx.clear_cache()


def _pool_and_memory(pool: BlockPool) -> Tuple[int, int]:
    gc.collect()  # handles dropped without release() return their blocks through a finalizer
    mx.synchronize()
    return pool.free_blocks, mx.get_active_memory()


# ---- the engine: the plan's loops, time to first token ------------------------------------------------------
def build_engine(model, tokenizer, settings: Settings) -> BlockPoolBatchEngine:
    """The plan's engine (pool of 500 blocks, or what the longest prompt needs if more), warmed up."""
    spec = ModelCacheSpec.from_model(model)
    plan_context = len(tokenizer.encode(PLAN_PROMPT)) + PLAN_MAX_TOKENS + TTFT_NEW_TOKENS
    need = max(3 * spec.blocks_per_agent(plan_context),  # loop 1's context, loop 2's, loop 3's new blocks
               2 * spec.blocks_per_agent(max(settings.ttft_tokens) + 1))  # a stored context and a prefill
    total = settings.pool_blocks if settings.pool_blocks is not None else max(PLAN_POOL_BLOCKS, need)
    if total < need:
        raise ExperimentError(
            f"--pool-blocks {total} is too small: this run's engine cases need {need} blocks of this model "
            f"({spec.blocks_per_agent(max(settings.ttft_tokens) + 1)} for one {max(settings.ttft_tokens)}-token "
            f"context of {spec.n_layers} layers); pass --pool-blocks {need} or more, or fewer --ttft-tokens"
        )
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, total_blocks=total), spec)
    engine.generate("warm-up", cases.prompt_tokens(engine, 16), max_tokens=2).blocks.release()
    return engine


def plan_loops(engine: BlockPoolBatchEngine, settings: Settings) -> dict:
    """The plan's three benchmark loops as written, each timed by ``measure`` (warm-up, iterations)."""
    engine.submit("agent", PLAN_PROMPT, max_tokens=PLAN_MAX_TOKENS)
    (first,) = engine.step()
    agent_blocks = first.blocks
    reconstruct = measure(lambda: engine._reconstruct_cache(agent_blocks), settings)

    engine.submit("agent", "Prompt", max_tokens=PLAN_MAX_TOKENS)
    (second,) = engine.step()
    queued: List[int] = []

    def submit_test() -> int:
        queued.append(engine.submit("agent", "Test", max_tokens=10))
        return queued[-1]

    with engine._extract_cache(submit_test()) as sample:
        extracted_tokens = sample.num_tokens
    extract = measure(engine._extract_cache, settings, setup=submit_test)
    for uid in queued:
        engine.cancel(uid)
    second.blocks.release()

    def resume():
        engine._reconstruct_cache(agent_blocks)
        engine.submit("agent", "Continue", cache=agent_blocks, max_tokens=10)
        (completion,) = engine.step()
        return completion.blocks  # released outside the clock

    round_trip = measure(resume, settings)
    context_tokens = agent_blocks.num_tokens
    agent_blocks.release()
    return {
        "context_tokens": context_tokens, "generated_tokens": len(first.token_ids),
        "reconstruct": reconstruct, "extract": extract, "extracted_tokens": extracted_tokens,
        "round_trip": round_trip,
    }


def time_to_first_token(engine: BlockPoolBatchEngine, n_tokens: int, settings: Settings) -> dict:
    """A prompt of ``n_tokens``: prefilled from nothing (direct), or its first ``n_tokens - 16`` resumed
    from blocks and 16 new ones prefilled (cached). The stored context holds random keys and values:
    resuming costs the same, and no prefill of it is needed."""
    context_tokens = n_tokens - TTFT_NEW_TOKENS
    stored = cache_to_blocks(engine.pool, "ttft-context", cases.random_caches(engine.spec, context_tokens),
                             cases.prompt_tokens(engine, context_tokens))
    try:
        rebuild = measure(lambda: engine._reconstruct_cache(stored), settings)
        new_turn = cases.prompt_tokens(engine, TTFT_NEW_TOKENS, seed=1)
        cached = _ttft_runs(lambda: cases.time_to_first_token(engine, new_turn, cache=stored), settings)
    finally:
        stored.release()
    full_prompt = cases.prompt_tokens(engine, n_tokens, seed=2)
    direct = _ttft_runs(lambda: cases.time_to_first_token(engine, full_prompt), settings)
    cached_stats, direct_stats = summarize(cached), summarize(direct)
    return {
        "tokens": n_tokens, "context_tokens": context_tokens, "new_tokens": TTFT_NEW_TOKENS,
        "reconstruct": rebuild, "cached_s": cached, "direct_s": direct,
        "cached_stats_s": cached_stats, "direct_stats_s": direct_stats,
        "cached_faster_by": direct_stats["mean"] / cached_stats["mean"],
    }


def _ttft_runs(run: Callable[[], float], settings: Settings) -> List[float]:
    """``ttft_repeats`` times to first token after ``ttft_warmup`` untimed runs (on GPU, a new prompt
    length compiles kernels on its first run)."""
    for _ in range(settings.ttft_warmup):
        run()
    return [run() for _ in range(settings.ttft_repeats)]


def engine_pool_state(engine: BlockPoolBatchEngine) -> dict:
    """After every engine case released what it held, the pool must be whole again."""
    gc.collect()
    engine.pool.check_invariants()
    free, total = engine.pool.free_blocks, engine.pool.total_blocks
    return {"total_blocks": total, "free_blocks_after": free, "status": "PASS" if free == total else "FAIL"}


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
