"""Device probe: warm resumes through the engine whose rebuild gives each full-attention layer a buffer of
its own when it has room for the prompt (``BlockPool.gather_apart``: mlx-lm's batch then writes the prompt
into it in place), against the same engine with the layers split from one gather (the code before: the
batch copies each layer whole at its first update), on the CPU device also without the rule that keeps
one-block layers as views, and mlx-lm's hot path (a deepcopy of the live cache inserted into the adapter's
generator). Sides alternated round by round in one process, each on its own stored copy of the context;
medians of 10 resumes after 5 per round, ms. Also the rebuild alone (room 16), split and apart, medians
of 50 after 10, with and without ``mx.clear_cache()`` before each (mlx-lm clears after every prefill step).

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe11.py OUT ROUNDS PRESET CONTEXTS
"""
import contextlib, copy, json, sys, time
from pathlib import Path
import semantic  # noqa: F401  (OpenBLAS first on CPU)
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import block_cache
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.request_checks import SamplingParams
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); rounds = int(sys.argv[2]); result = {}
on_cpu = mx.default_device() == mx.cpu
model, tokenizer = load_local_model(sys.argv[3], dtype="float32" if on_cpu else "bfloat16")
contexts = [int(x) for x in sys.argv[4].split(",")]
spec = ModelCacheSpec.from_model(model)
sides_names = ["engine", "engine_split"] + (["engine_no_view_rule"] if on_cpu else [])
pool = BlockPool(spec, total_blocks=(len(sides_names) + 3) * spec.blocks_per_agent(max(contexts) + 64))
engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
original_gathered, original_host = block_cache._gathered_layers, block_cache.writes_through_host


@contextlib.contextmanager
def patched(name):
    if name == "engine_split":
        block_cache._gathered_layers = lambda pool, group, apart: original_gathered(pool, group, False)
    if name == "engine_no_view_rule":
        block_cache.writes_through_host = lambda: False
    try:
        yield
    finally:
        block_cache._gathered_layers, block_cache.writes_through_host = original_gathered, original_host


hot = adapter.Generator(model, stop_token_ids=[])
for n in contexts:
    context, stored = cases.random_caches(spec, n), cases.prompt_tokens(engine, n)
    handles = {name: cache_to_blocks(pool, name, context, stored) for name in sides_names}
    live = [adapter.build_layer_cache(w, mx.array(c.keys), mx.array(c.values), c.offset)
            for w, c in zip(spec.layer_windows, blocks_to_cache(pool, handles["engine"]))]
    new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)

    def engine_side(name):
        with patched(name):
            engine.submit("warm-resume", new_tokens, cache=handles[name], max_tokens=1)
            (c,) = engine.step()
        adapter.synchronize(); c.blocks.release(); return c.token_ids[-1]

    def hot_side(_):
        uid = hot.insert(new_tokens, copy.deepcopy(live), stored, 1, SamplingParams(), None)
        while True:
            for e in hot.next():
                if e.uid == uid and e.finish_reason:
                    adapter.synchronize(); return e.token

    sides = {**{name: engine_side for name in sides_names}, "hot_path": hot_side}
    rows = {k: [] for k in sides}; tokens = {}
    for rnd in range(rounds):
        for name, fn in sides.items():
            times = []
            for i in range(15):
                t0 = time.perf_counter(); tokens.setdefault(name, fn(name)); times.append(time.perf_counter() - t0)
            rows[name].append(round(float(np.median(times[5:]) * 1e3), 3))
    rows["same_token"] = len(set(tokens.values())) == 1
    rebuild = {}
    for clear in (False, True):
        for name in ("engine", "engine_split"):
            times = []
            for i in range(60):
                if clear:
                    mx.clear_cache()
                with patched(name):
                    t0 = time.perf_counter()
                    caches = blocks_to_cache(pool, handles[name], room=cases.RESUME_NEW_TOKENS)
                    adapter.synchronize(); times.append(time.perf_counter() - t0)
                del caches
            rebuild[f"{name}{'_after_clear_cache' if clear else ''}"] = round(float(np.median(times[10:]) * 1e3), 4)
    rows["rebuild_alone"] = rebuild
    result[n] = rows
    print(n, json.dumps(rows), flush=True)
    for h in handles.values():
        h.release()
(out / "probe11.json").write_text(json.dumps(result, indent=1))
