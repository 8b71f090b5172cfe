"""Device probe: does a warm resume wait for the device in its rebuild and its store? Sides alternated resume
by resume (medians of 30 after 5, ms, host timers): the engine as it is; the engine with the pool's and the
rebuild's evaluations queued instead of waited for (``mx.async_eval`` in place of ``mx.eval`` in
``semantic.domain.services`` and ``semantic.application.block_cache``); mlx-lm's hot path. Then the rebuild
alone (8K context, room for 16 tokens), with and without ``mx.clear_cache()`` before it (mlx-lm clears
MLX's buffer cache after every prefill step), p50 of 50.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04c/probe10.py OUT PRESET CONTEXTS
"""
import copy, json, sys, time
from collections import defaultdict
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import batch_engine as be, block_cache as bc
from semantic.domain import services
from semantic.domain.request_checks import SamplingParams
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model


class QueuedEvals:
    eval = staticmethod(mx.async_eval)

    def __getattr__(self, name):
        return getattr(mx, name)


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


engine._reconstruct_cache = timed("rebuild", engine._reconstruct_cache)
be.cache_to_blocks = timed("store", be.cache_to_blocks)
result = {}
for n in contexts:
    h = bc.cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
    live = [adapter.build_layer_cache(w, mx.array(c.keys), mx.array(c.values), c.offset)
            for w, c in zip(spec.layer_windows, bc.blocks_to_cache(pool, h))]
    new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)

    def engine_side(queued):
        services.mx = bc.mx = QueuedEvals() if queued else mx
        try:
            t0 = time.perf_counter()
            engine.submit("warm-resume", new_tokens, cache=h, max_tokens=1)
            (c,) = engine.step()
            adapter.synchronize()
            phases["total"] += time.perf_counter() - t0
            c.blocks.release()
        finally:
            services.mx = bc.mx = mx
        return c.token_ids[-1]

    def hot_side(_):
        t0 = time.perf_counter()
        uid = hot.insert(new_tokens, copy.deepcopy(live), h.token_ids, 1, SamplingParams(), None)
        while True:
            for e in hot.next():
                if e.uid == uid and e.finish_reason:
                    adapter.synchronize()
                    phases["total"] += time.perf_counter() - t0
                    return e.token

    sides = {"engine": (engine_side, False), "engine_queued": (engine_side, True), "hot_path": (hot_side, None)}
    per = defaultdict(list); tokens = {}
    for i in range(35):
        for name, (fn, arg) in sides.items():
            phases.clear()
            tokens.setdefault(name, fn(arg))
            if i >= 5:
                for k, v in phases.items():
                    per[f"{name}.{k}"].append(v * 1e3)
    row = {k: round(float(np.median(v)), 3) for k, v in sorted(per.items())}
    row["same_token"] = len(set(tokens.values())) == 1
    for clear in (False, True, False, True):
        times = []
        for _ in range(55):
            if clear:
                mx.clear_cache()
            adapter.synchronize()
            t0 = time.perf_counter()
            caches = bc.blocks_to_cache(pool, h, room=16)
            adapter.synchronize()
            times.append(time.perf_counter() - t0)
            del caches
        row.setdefault(f"rebuild_alone_clear_cache_{clear}", []).append(round(float(np.median(times[5:]) * 1e3), 3))
    result[n] = row
    print(n, json.dumps(row), flush=True)
    h.release()
(out / "probe10.json").write_text(json.dumps(result, indent=1))
