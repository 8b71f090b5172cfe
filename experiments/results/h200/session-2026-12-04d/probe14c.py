"""CPU probe: cProfile of the first store of a finished warm resume's buffers and of the same store repeated
at once (10 resumes of 256 tokens), each printed by internal time.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04d/probe14c.py
"""
import sys, time, cProfile, pstats, io
import numpy as np
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
n = 256
pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(n + 64))
engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
handle = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
profs = [cProfile.Profile(), cProfile.Profile()]
def store(*a, **k):
    adapter.synchronize()
    profs[0].enable(); out = cache_to_blocks(*a, **k); adapter.synchronize(); profs[0].disable()
    profs[1].enable(); b = cache_to_blocks(*a, **{**k, "reservation": None}); adapter.synchronize(); profs[1].disable()
    b.release()
    return out
batch_engine.cache_to_blocks = store
new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)
for i in range(10):
    engine.submit("warm-resume", new_tokens, cache=handle, max_tokens=1)
    (c,) = engine.step(); adapter.synchronize(); c.blocks.release()
for p in profs:
    s = io.StringIO(); pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(8); print(s.getvalue()[:2500])
