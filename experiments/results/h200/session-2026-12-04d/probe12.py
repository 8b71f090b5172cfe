"""Device probe: where a warm resume's store and rebuild go in place. Engine warm resumes (smollm2-135m
preset, the contexts given, 16 new tokens, one sampled), with ``cache_to_blocks`` and
``_reconstruct_cache`` wrapped: a synchronize before each (what was still queued: ``wait_ms``), the call
itself up to a synchronize (``ms``), and whether the pool's key array kept its buffer across the store
(``pool_in_place``: MLX updated it in place; else it copied the whole pool). Two pool sizes (2x and 12x the
blocks of one context): a store that copies the pool would take longer in the larger one. Medians of 20
resumes after 5.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe12.py OUT CONTEXTS
"""
import json, sys, time
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters.mlx_kernels import host_view
from semantic.application import batch_engine
from semantic.application.block_cache import cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
records = []
original_store, original_rebuild = batch_engine.cache_to_blocks, BlockPoolBatchEngine._reconstruct_cache


def address(array):
    return host_view(array[:1]).ctypes.data


def timed(name, fn, pool=None):
    t0 = time.perf_counter(); adapter.synchronize(); t1 = time.perf_counter()
    before = address(pool._keys) if pool is not None else None
    result = fn(); adapter.synchronize(); t2 = time.perf_counter()
    row = {"phase": name, "wait_ms": (t1 - t0) * 1e3, "ms": (t2 - t1) * 1e3}
    if pool is not None:
        row["pool_in_place"] = address(pool._keys) == before
    records.append(row)
    return result


batch_engine.cache_to_blocks = lambda pool, *a, **k: timed("store", lambda: original_store(pool, *a, **k), pool)
BlockPoolBatchEngine._reconstruct_cache = lambda self, *a, **k: timed("rebuild", lambda: original_rebuild(self, *a, **k))
result = {}
for n in [int(x) for x in sys.argv[2].split(",")]:
    for scale in (2, 12):
        pool = BlockPool(spec, total_blocks=scale * spec.blocks_per_agent(n + 64))
        engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
        handle = original_store(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
        new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)
        totals = []
        records.clear()
        for i in range(25):
            t0 = time.perf_counter()
            engine.submit("warm-resume", new_tokens, cache=handle, max_tokens=1)
            (c,) = engine.step(); adapter.synchronize(); totals.append(time.perf_counter() - t0)
            c.blocks.release()
        rows = {"total_ms": float(np.median(totals[5:]) * 1e3), "pool_mib": pool.nbytes / 2**20}
        for phase in ("rebuild", "store"):
            mine = [r for r in records if r["phase"] == phase][5:]
            rows[phase] = {key: float(np.median([r[key] for r in mine])) for key in ("wait_ms", "ms")}
            if phase == "store":
                rows[phase]["pool_in_place"] = sum(r["pool_in_place"] for r in mine) / len(mine)
        result[f"{n}_x{scale}"] = rows
        print(n, scale, json.dumps(rows), flush=True)
        handle.release(); engine.close()
(out / "probe12.json").write_text(json.dumps(result, indent=1))
