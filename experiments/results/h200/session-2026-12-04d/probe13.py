"""Device probe: a warm resume with the engine's rebuild and store on mlx-lm's generation stream (where its
``BatchGenerator`` runs: no dependency crosses streams) against the engine as it is (both on the default
stream) and mlx-lm's hot path. Sides alternated in rounds, medians of 10 resumes after 5 per round, ms;
then each engine side's rebuild and store in place (synchronized before and after), medians of 20.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe13.py OUT ROUNDS CONTEXTS
"""
import contextlib, copy, json, sys, time
from pathlib import Path
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
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
contexts = [int(x) for x in sys.argv[3].split(",")]
pool = BlockPool(spec, total_blocks=6 * spec.blocks_per_agent(max(contexts) + 64))
engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
original_store, original_rebuild = batch_engine.cache_to_blocks, BlockPoolBatchEngine._reconstruct_cache
phases = []


def timed(name, fn):
    if not timing:
        return fn()
    adapter.synchronize(); t0 = time.perf_counter()
    result = fn(); adapter.synchronize(); phases.append((name, (time.perf_counter() - t0) * 1e3))
    return result


def on_stream(fn):
    def call(*a, **k):
        with (mx.stream(adapter.generation_stream) if use_generation_stream else contextlib.nullcontext()):
            return fn(*a, **k)
    return call


batch_engine.cache_to_blocks = on_stream(lambda *a, **k: timed("store", lambda: original_store(*a, **k)))
BlockPoolBatchEngine._reconstruct_cache = on_stream(lambda *a, **k: timed("rebuild", lambda: original_rebuild(*a, **k)))
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

    sides = {"engine": (engine_side, False), "engine_generation_stream": (engine_side, True),
             "hot_path": (hot_side, False)}
    rows = {k: [] for k in sides}; tokens = {}; timing = False
    for rnd in range(rounds):
        for name, (fn, use_generation_stream) in sides.items():
            times = []
            for i in range(15):
                t0 = time.perf_counter(); tokens.setdefault(name, fn()); times.append(time.perf_counter() - t0)
            rows[name].append(round(float(np.median(times[5:]) * 1e3), 3))
    rows["same_token"] = len(set(tokens.values())) == 1
    timing = True
    for name in ("engine", "engine_generation_stream"):
        use_generation_stream = name != "engine"
        phases.clear()
        for i in range(25):
            engine_side()
        for phase in ("rebuild", "store"):
            rows[f"{name}.{phase}_in_place_ms"] = round(float(np.median([t for p, t in phases if p == phase][5:])), 3)
    result[n] = rows
    print(n, json.dumps(rows), flush=True)
    h.release()
(out / "probe13.json").write_text(json.dumps(result, indent=1))
