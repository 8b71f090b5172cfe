"""Device probe (not committed): the first store of a finished sequence's cache, by how its layers'
arrays come out of the batch (views, whole buffers, views evaluated at extraction, mlx-lm's copies)."""
import json, sys, time
from pathlib import Path
import mlx.core as mx, numpy as np
from mlx_lm.models.cache import KVCache
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain.request_checks import SamplingParams
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1])
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(1400))
h = cache_to_blocks(pool, "stored", cases.random_caches(spec, 1024), list(range(1, 1025)))
new_tokens = list(range(100, 116))

def whole(c, idx):
    v = KVCache(); v.keys, v.values = c.keys, c.values; v.offset = c.keys.shape[2]; return v
def views_evaluated(c, idx):
    v = adapter.extract_view(c, idx); mx.eval(v.keys, v.values); return v
variants = {"views": adapter.extract_view, "whole_buffers": whole, "views_evaluated_in_extract": views_evaluated,
            "mlx_lm_extract": lambda c, idx: c.extract(idx)}
gen = adapter.Generator(model, stop_token_ids=[])
times = {k: [] for k in variants}
for rnd in range(20):
    for name, fn in variants.items():
        batch = gen._gen._generation_batch
        batch.extract_cache = lambda idx, batch=batch, fn=fn: [fn(c, idx) for c in batch.prompt_cache]
        cache = blocks_to_cache(pool, h)
        uid = gen.insert(new_tokens, cache, h.token_ids, 1, SamplingParams(), None)
        del cache
        done = None
        t_start = time.perf_counter()
        while done is None:
            done = next((e for e in gen.next() if e.uid == uid and e.finish_reason), None)
        t_next = time.perf_counter()
        adapter.synchronize()
        caches, tokens = done.cache, done.context_tokens
        tokens = tokens + [0] * (caches[0].offset - len(tokens))
        t0 = time.perf_counter()
        stored = cache_to_blocks(pool, "x", caches, tokens, source=h, reused_tokens=1024)
        mx.synchronize(); t1 = time.perf_counter()
        stored.release(); del caches, done
        if rnd >= 4:
            times[name].append(((t1 - t0) * 1e3, (t_next - t_start) * 1e3))
result = {k: {"store_ms_p50": float(np.median([t[0] for t in v])), "store_ms_p90": float(np.percentile([t[0] for t in v], 90)),
              "generate_ms_p50": float(np.median([t[1] for t in v]))} for k, v in times.items()}
print(json.dumps(result, indent=1))
(out / "probe5.json").write_text(json.dumps(result, indent=1))
