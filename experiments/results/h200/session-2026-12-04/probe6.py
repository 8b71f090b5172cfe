"""Device probe: warm resumes with and without the prompt batch's split override (adapter.split_moving_all),
for the engine and for mlx-lm's hot path (a deepcopy of the live cache inserted into a generator), four
sides alternated round by round in one process. ``*_mlx_lm_split``: the generator's prompt batch back to
mlx-lm's own split; ``hot_path_stock``: both of the adapter's overrides removed (mlx-lm as shipped)."""
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

out = Path(sys.argv[1]); rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4; result = {}
model, tokenizer = load_local_model(sys.argv[3] if len(sys.argv) > 3 else "smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, total_blocks=6 * spec.blocks_per_agent(4096 + 64))
engines = {"engine": BlockPoolBatchEngine(model, tokenizer, pool, spec),
           "engine_mlx_lm_split": BlockPoolBatchEngine(model, tokenizer, pool, spec)}
del engines["engine_mlx_lm_split"]._generator._gen._prompt_batch.split
hot = {"hot_path": adapter.Generator(model, stop_token_ids=[]), "hot_path_mlx_lm_split": adapter.Generator(model, stop_token_ids=[]),
       "hot_path_stock": adapter.Generator(model, stop_token_ids=[])}
del hot["hot_path_mlx_lm_split"]._gen._prompt_batch.split
stock = hot["hot_path_stock"]._gen
del stock._prompt_batch.split, stock._prompt_batch.extract_cache, stock._generation_batch.extract_cache

for n in [int(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "1024,4096").split(",")]:
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
    sides = {**{k: (engine_side, e) for k, e in engines.items()}, **{k: (hot_side, g) for k, g in hot.items()}}
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
(out / "probe6.json").write_text(json.dumps(result, indent=1))
