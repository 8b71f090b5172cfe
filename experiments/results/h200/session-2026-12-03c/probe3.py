"""Device probe (not committed): a warm resume's store with sequences extracted as views of the batch
(the engine now) against mlx-lm's extract (a contiguous copy per layer), alternated in one process."""
import json, sys, time
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.application import batch_engine
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.block_cache import cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1]); result = {}
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, total_blocks=6 * spec.blocks_per_agent(4096 + 64))
engines = {"views": BlockPoolBatchEngine(model, tokenizer, pool, spec),
           "mlx_lm_extract": BlockPoolBatchEngine(model, tokenizer, pool, spec)}
gen = engines["mlx_lm_extract"]._generator._gen
for batch in (gen._prompt_batch, gen._generation_batch):
    del batch.extract_cache  # back to mlx-lm's own method
split = []
def timed_store(*a, **k):
    t0 = time.perf_counter(); adapter.synchronize(); t1 = time.perf_counter()
    r = cache_to_blocks(*a, **k); mx.synchronize(); t2 = time.perf_counter()
    split.append((t1 - t0, t2 - t1)); return r
batch_engine.cache_to_blocks = timed_store
for n in (1024, 4096):
    h = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engines["views"], n))
    new_tokens = cases.prompt_tokens(engines["views"], cases.RESUME_NEW_TOKENS, seed=2)
    texts = {}
    rows = {side: {"total_ms": [], "pending_ms": [], "store_ms": []} for side in engines}
    for rnd in range(4):
        for side, engine in engines.items():
            split.clear(); total = []
            for i in range(15):
                t0 = time.perf_counter()
                engine.submit("warm-resume", new_tokens, cache=h, max_tokens=1)
                (c,) = engine.step(); adapter.synchronize(); total.append(time.perf_counter() - t0)
                texts.setdefault(side, c.token_ids); c.blocks.release()
            s = np.array(split[5:]) * 1e3
            rows[side]["total_ms"].append(float(np.median(total[5:]) * 1e3))
            rows[side]["store_ms"].append(float(np.median(s[:, 1])))
            rows[side]["pending_ms"].append(float(np.median(s[:, 0])))
    rows["same_tokens"] = texts["views"] == texts["mlx_lm_extract"]
    result[n] = rows
    print(n, json.dumps(rows), flush=True)
    h.release()
(out / "probe3.json").write_text(json.dumps(result, indent=1))
