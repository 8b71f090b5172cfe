"""Device probe: a warm resume's store in place, split. Engine warm resumes (smollm2-135m preset, 16 new
tokens, one sampled); ``cache_to_blocks`` synchronized before and timed to a synchronize after (``store``);
inside it, the pack kernel evaluated on its own (``pack``: the new blocks cut from the batch's buffers) and
``BlockPool._write_packed`` timed to a synchronize (``write_packed``, the pack included); the rest of the
store is Python. The same phases for a store of the same kind of cache outside the engine (the batch's
buffers of a finished resume, kept; ``alone``), with and without ``mx.clear_cache()`` before it. Medians of
20 after 5, ms.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe14.py OUT CONTEXTS
"""
import json, sys, time
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import batch_engine
from semantic.application.block_cache import cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain import services
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
phases = []
original_pack, original_write = services.pack_blocks, BlockPool._write_packed


def clocked(name, fn):
    adapter.synchronize(); t0 = time.perf_counter()
    result = fn()
    if isinstance(result, tuple):
        mx.eval(result)
    adapter.synchronize(); phases.append((name, (time.perf_counter() - t0) * 1e3))
    return result


services.pack_blocks = lambda *a, **k: clocked("pack", lambda: original_pack(*a, **k))
BlockPool._write_packed = lambda self, writes: clocked("write_packed", lambda: original_write(self, writes))
kept = []


def store(*a, **k):
    kept[:] = [a, k]
    return clocked("store", lambda: cache_to_blocks(*a, **k))


batch_engine.cache_to_blocks = store
result = {}
for n in [int(x) for x in sys.argv[2].split(",")]:
    pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(n + 64))
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    handle = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
    new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)
    phases.clear()
    for i in range(25):
        engine.submit("warm-resume", new_tokens, cache=handle, max_tokens=1)
        (c,) = engine.step(); adapter.synchronize(); c.blocks.release()
    rows = {}
    def summary(prefix):
        for name in ("store", "write_packed", "pack"):
            rows[f"{prefix}.{name}"] = round(float(np.median([t for p, t in phases if p == name][5:])), 3)
    summary("in_place")
    a, k = kept
    k = {**k, "source": handle, "reservation": None}  # the request's own share and reservation are gone
    for clear in (False, True):
        phases.clear()
        for i in range(25):
            if clear:
                mx.clear_cache()
            clocked("store", lambda: cache_to_blocks(*a, **k)).release()
        summary("alone_after_clear_cache" if clear else "alone")
    result[n] = rows
    print(n, json.dumps(rows), flush=True)
    kept.clear(); handle.release(); engine.close()
(out / "probe14.json").write_text(json.dumps(result, indent=1))
