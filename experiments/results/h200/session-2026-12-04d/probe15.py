"""Device probe: a warm resume's cost of mlx-lm's ``mx.clear_cache()`` (called after every prefill step:
every buffer MLX had cached is given back, so the next allocations are fresh ones). The engine and mlx-lm's
hot path (a deepcopy of the live cache inserted into the adapter's generator), each as it is and with
``mx.clear_cache`` made a no-op during its resumes (MLX's cache then stays within its limit, which the pool
sets). Sides alternated in rounds, medians of 10 resumes after 5 per round, ms; then the engine's rebuild
and store in place (synchronized before and after), medians of 20, with and without the clearing.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe15.py OUT ROUNDS PRESET CONTEXTS
"""
import contextlib, copy, json, sys, time
from pathlib import Path
import semantic  # noqa: F401  (OpenBLAS first on CPU)
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import batch_engine
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.request_checks import SamplingParams
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); rounds = int(sys.argv[2])
on_cpu = mx.default_device() == mx.cpu
model, tokenizer = load_local_model(sys.argv[3], dtype="float32" if on_cpu else "bfloat16")
spec = ModelCacheSpec.from_model(model)
contexts = [int(x) for x in sys.argv[4].split(",")]
pool = BlockPool(spec, total_blocks=6 * spec.blocks_per_agent(max(contexts) + 64))
engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
original_store, original_rebuild, clear_cache = batch_engine.cache_to_blocks, BlockPoolBatchEngine._reconstruct_cache, mx.clear_cache
phases = []
timing = False


def timed(name, fn):
    if not timing:
        return fn()
    adapter.synchronize(); t0 = time.perf_counter()
    result = fn(); adapter.synchronize(); phases.append((name, (time.perf_counter() - t0) * 1e3))
    return result


@contextlib.contextmanager
def clearing(on):
    mx.clear_cache = clear_cache if on else (lambda: None)
    try:
        yield
    finally:
        mx.clear_cache = clear_cache


batch_engine.cache_to_blocks = lambda *a, **k: timed("store", lambda: original_store(*a, **k))
BlockPoolBatchEngine._reconstruct_cache = lambda *a, **k: timed("rebuild", lambda: original_rebuild(*a, **k))
hot = adapter.Generator(model, stop_token_ids=[])
result = {}
for n in contexts:
    h = original_store(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
    live = [adapter.build_layer_cache(w, mx.array(c.keys), mx.array(c.values), c.offset)
            for w, c in zip(spec.layer_windows, blocks_to_cache(pool, h))]
    new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)

    def engine_side():
        engine.submit("warm-resume", new_tokens, cache=h, max_tokens=1)
        (c,) = engine.step(); adapter.synchronize(); c.blocks.release(); return c.token_ids[-1]

    def hot_side():
        uid = hot.insert(new_tokens, copy.deepcopy(live), h.token_ids, 1, SamplingParams(), None)
        while True:
            for e in hot.next():
                if e.uid == uid and e.finish_reason:
                    adapter.synchronize(); return e.token

    sides = {"engine": (engine_side, True), "hot_path": (hot_side, True),
             "engine_no_clear": (engine_side, False), "hot_path_no_clear": (hot_side, False)}
    rows = {k: [] for k in sides}; tokens = {}
    for rnd in range(rounds):
        for name, (fn, clears) in sides.items():
            times = []
            with clearing(clears):
                for i in range(15):
                    t0 = time.perf_counter(); tokens.setdefault(name, fn()); times.append(time.perf_counter() - t0)
            mx.clear_cache()
            rows[name].append(round(float(np.median(times[5:]) * 1e3), 3))
    rows["same_token"] = len(set(tokens.values())) == 1
    timing = True
    for clears in (True, False):
        phases.clear()
        with clearing(clears):
            for i in range(25):
                engine_side()
        for phase in ("rebuild", "store"):
            rows[f"{phase}_in_place_ms{'' if clears else '_no_clear'}"] = round(
                float(np.median([t for p, t in phases if p == phase][5:])), 3)
    timing = False
    result[n] = rows
    print(n, json.dumps(rows), flush=True)
    h.release()
(out / "probe15.json").write_text(json.dumps(result, indent=1))
