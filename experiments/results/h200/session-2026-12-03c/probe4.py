"""Device probe (not committed): where a warm resume's store spends its ~1.7 ms (1 block x 30 layers)."""
import cProfile, io, json, pstats, sys, time
from pathlib import Path
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application import batch_engine
from semantic.application.block_cache import cache_to_blocks
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain import services
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

out = Path(sys.argv[1])
evals = []
class TimedMx:
    def __getattr__(self, name): return getattr(mx, name)
    def eval(self, *a):
        t0 = time.perf_counter(); mx.eval(*a); evals.append(time.perf_counter() - t0)
services.mx = TimedMx()
model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, total_blocks=6 * spec.blocks_per_agent(4096 + 64))
engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
prof = cProfile.Profile(); rows = []
def timed_store(*a, **k):
    adapter.synchronize()
    evals.clear(); t0 = time.perf_counter()
    prof.enable(); r = cache_to_blocks(*a, **k); prof.disable()
    mx.synchronize(); t1 = time.perf_counter(); first_evals = list(evals); evals.clear()
    again = cache_to_blocks(a[0], "again", a[2], a[3], source=k.get("source"), reused_tokens=k.get("reused_tokens", 0))
    mx.synchronize(); t2 = time.perf_counter(); again.release()
    plain = [adapter.build_layer_cache(None, mx.array(c.keys), mx.array(c.values), c.offset) for c in a[2]]
    mx.eval([(c.keys, c.values) for c in plain]); t3 = time.perf_counter()
    third = cache_to_blocks(a[0], "plain", plain, a[3], source=k.get("source"), reused_tokens=k.get("reused_tokens", 0))
    mx.synchronize(); t4 = time.perf_counter(); third.release()
    rows.append((t1 - t0, sum(first_evals), t2 - t1, t4 - t3, sum(evals)))
    return r
batch_engine.cache_to_blocks = timed_store
n = 1024
h = cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
new_tokens = cases.prompt_tokens(engine, cases.RESUME_NEW_TOKENS, seed=2)
for i in range(25):
    engine.submit("warm-resume", new_tokens, cache=h, max_tokens=1)
    (c,) = engine.step(); adapter.synchronize(); c.blocks.release()
r = np.array(rows[5:]) * 1e3
result = {k: float(np.median(r[:, i])) for i, k in enumerate(
    ["store_ms", "store_eval_ms", "same_store_again_ms", "store_of_contiguous_copies_ms", "evals_of_both_again_ms"])}
print(json.dumps(result), flush=True)
(out / "probe4.json").write_text(json.dumps(result, indent=1))
s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30); (out / "probe4_profile.txt").write_text(s.getvalue())
print(s.getvalue()[:3000])
