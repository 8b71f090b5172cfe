"""Device probe: warm resumes through the engine with a lone rebuilt cache merged into mlx-lm's batch as it
is (``adapter.merge_keeping_arrays``) and rebuilt with room for the prompt (``blocks_to_cache(room=)``),
against the same engine without the room, without either (the code before), and mlx-lm's hot path (a
deepcopy of the live cache inserted into the adapter's generator). Four sides alternated round by round
in one process; medians of 10 resumes after 5 per round, ms.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04c/probe8.py OUT ROUNDS PRESET CONTEXTS
"""
import copy, json, sys, time
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.request_checks import SamplingParams
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1]); rounds = int(sys.argv[2]); result = {}
model, tokenizer = load_local_model(sys.argv[3], dtype="bfloat16")
contexts = [int(x) for x in sys.argv[4].split(",")]
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, total_blocks=6 * spec.blocks_per_agent(max(contexts) + 64))
engines = {name: BlockPoolBatchEngine(model, tokenizer, pool, spec) for name in ("engine", "engine_no_room", "engine_before")}


def variant(engine, keep_merge):
    def reconstruct(agent_blocks, n_tokens=None, prompt_tokens=0, generator=None):
        caches = BlockPoolBatchEngine._reconstruct_cache(engine, agent_blocks, n_tokens, 0, generator)
        if not keep_merge:
            for c in caches:
                c.__dict__.pop("merge", None)
        return caches
    engine._reconstruct_cache = reconstruct


variant(engines["engine_no_room"], True)
variant(engines["engine_before"], False)
hot = adapter.Generator(model, stop_token_ids=[])

for n in contexts:
    h = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engines["engine"], n))
    live = [adapter.build_layer_cache(w, mx.array(c.keys), mx.array(c.values), c.offset)
            for w, c in zip(spec.layer_windows, blocks_to_cache(pool, h))]
    new_tokens = cases.prompt_tokens(engines["engine"], cases.RESUME_NEW_TOKENS, seed=2)

    def engine_side(engine):
        engine.submit("warm-resume", new_tokens, cache=h, max_tokens=1)
        (c,) = engine.step(); adapter.synchronize(); c.blocks.release(); return c.token_ids[-1]

    def hot_side(gen):
        uid = gen.insert(new_tokens, copy.deepcopy(live), h.token_ids, 1, SamplingParams(), None)
        while True:
            for e in gen.next():
                if e.uid == uid and e.finish_reason:
                    adapter.synchronize(); return e.token

    sides = {**{k: (engine_side, e) for k, e in engines.items()}, "hot_path": (hot_side, hot)}
    rows = {k: [] for k in sides}; tokens = {}
    for rnd in range(rounds):
        for name, (fn, obj) in sides.items():
            times = []
            for i in range(15):
                t0 = time.perf_counter(); tokens.setdefault(name, fn(obj)); times.append(time.perf_counter() - t0)
            rows[name].append(round(float(np.median(times[5:]) * 1e3), 3))
    rows["same_token"] = len(set(tokens.values())) == 1
    result[n] = rows
    print(n, json.dumps(rows), flush=True)
    h.release()
(out / "probe8.json").write_text(json.dumps(result, indent=1))
