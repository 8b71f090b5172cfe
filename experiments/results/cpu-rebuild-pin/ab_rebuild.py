import semantic, timeit, json, sys
import mlx.core as mx
from semantic.benchmarking import cases
from semantic.application import block_cache as bc
ctx = cases.context("smollm2-135m", 1, 12, 1)
pool, h = ctx.pool, ctx.handle
f = lambda: bc.blocks_to_cache(pool, h)
for _ in range(200): f()
n = 5000
best = min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6
print(json.dumps({"tree": sys.argv[1], "blocks_to_cache_1x12_us_min_of_7x5000": round(best, 2)}))
