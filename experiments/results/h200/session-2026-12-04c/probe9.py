"""Device probe: where a warm resume's time goes, engine against mlx-lm's hot path, by phase. Each phase is
timed on the host (perf_counter, no extra synchronisation: MLX keeps running queued work meanwhile, so a
phase that waits for the device holds that wait). Sides alternated resume by resume; medians of 30 after 5,
ms. Then cProfile of 20 resumes per side (top functions by internal time).

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04c/probe9.py OUT PRESET CONTEXTS
"""
import copy, cProfile, io, json, pstats, sys, time
from collections import defaultdict
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import batch_engine as be
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain.request_checks import SamplingParams
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1])
model, tokenizer = load_local_model(sys.argv[2], dtype="bfloat16")
contexts = [int(x) for x in sys.argv[3].split(",")]
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(max(contexts) + 64))
engine = be.BlockPoolBatchEngine(model, tokenizer, pool, spec)
hot = adapter.Generator(model, stop_token_ids=[])
phases = defaultdict(float)


def timed(name, fn):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - t0
    return call


engine._reconstruct_cache = timed("engine.rebuild", engine._reconstruct_cache)
engine._generator.next = timed("engine.generator_next", engine._generator.next)
engine._generator.insert = timed("engine.generator_insert", engine._generator.insert)
be.cache_to_blocks = timed("engine.store", be.cache_to_blocks)
hot.next = timed("hot.generator_next", hot.next)
hot.insert = timed("hot.generator_insert", hot.insert)
result = {}
for n in contexts:
    h = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
    live = [adapter.build_layer_cache(w, mx.array(c.keys), mx.array(c.values), c.offset)
            for w, c in zip(spec.layer_windows, blocks_to_cache(pool, h))]
    new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)

    def engine_side():
        t0 = time.perf_counter()
        timed("engine.submit", engine.submit)("warm-resume", new_tokens, cache=h, max_tokens=1)
        t1 = time.perf_counter()
        (c,) = engine.step()
        t2 = time.perf_counter()
        adapter.synchronize()
        t3 = time.perf_counter()
        c.blocks.release()
        t4 = time.perf_counter()
        phases["engine.step"] += t2 - t1; phases["engine.final_sync"] += t3 - t2; phases["engine.release"] += t4 - t3
        phases["engine.total"] += t4 - t0

    def hot_side():
        t0 = time.perf_counter()
        cache = copy.deepcopy(live)
        t1 = time.perf_counter()
        uid = hot.insert(new_tokens, cache, h.token_ids, 1, SamplingParams(), None)
        done = False
        while not done:
            done = any(e.uid == uid and e.finish_reason for e in hot.next())
        t2 = time.perf_counter()
        adapter.synchronize()
        t3 = time.perf_counter()
        phases["hot.deepcopy"] += t1 - t0; phases["hot.final_sync"] += t3 - t2; phases["hot.total"] += t3 - t0

    per = defaultdict(list)
    for i in range(35):
        for side in (engine_side, hot_side):
            phases.clear()
            side()
            if i >= 5:
                for k, v in phases.items():
                    per[k].append(v * 1e3)
    result[n] = {k: round(float(np.median(v)), 3) for k, v in sorted(per.items())}
    print(n, json.dumps(result[n]), flush=True)
    for name, side in (("engine", engine_side), ("hot", hot_side)):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            side()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(45)
        (out / f"profile_{name}_{n}.txt").write_text(s.getvalue())
    h.release()
(out / "probe9.json").write_text(json.dumps(result, indent=1))
