"""CPU probe: the first store of a finished warm resume's buffers (as the engine makes it) against the same
store repeated twice at once with the same arguments (less the reservation, which the first used). Medians of 20
after 5, ms.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe14b.py CONTEXT
"""
import sys, time, json
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import batch_engine
from semantic.application.block_cache import cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
n = int(sys.argv[1])
pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(n + 64))
engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
handle = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
times = {"first": [], "second": [], "third_no_reservation": [], "gap_ms": []}
def store(*a, **k):
    adapter.synchronize(); t0 = time.perf_counter()
    out = cache_to_blocks(*a, **k); adapter.synchronize(); t1 = time.perf_counter()
    times["first"].append(t1 - t0)
    res = k["reservation"]
    b = cache_to_blocks(*a, **{**k, "reservation": None}); adapter.synchronize(); t2 = time.perf_counter()
    times["second"].append(t2 - t1); b.release()
    b = cache_to_blocks(*a, **{**k, "reservation": None}); adapter.synchronize(); t3 = time.perf_counter()
    times["third_no_reservation"].append(t3 - t2); b.release()
    return out
batch_engine.cache_to_blocks = store
new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)
for i in range(25):
    engine.submit("warm-resume", new_tokens, cache=handle, max_tokens=1)
    (c,) = engine.step(); adapter.synchronize(); c.blocks.release()
print(n, {k: round(float(np.median(v[5:])) * 1e3, 3) for k, v in times.items() if v})
