import sys, time, json, numpy as np
import semantic
import mlx.core as mx
from semantic.benchmarking import cases
from semantic.application.block_cache import cache_to_blocks
out = {}
for blocks, layers in ((4, 24), (8, 30)):
    ctx = cases.context("smollm2-135m", blocks, layers, blocks)
    n = len(ctx.tokens)
    def store_all():
        return cases.extract(ctx)
    def store_reusing():  # a resume's store: all but the last block shared with the source
        return cache_to_blocks(ctx.pool, "r", ctx.caches, ctx.tokens, source=ctx.handle, reused_tokens=n - 16)
    for name, fn in (("store", store_all), ("store reusing", store_reusing)):
        ts = []
        for i in range(320):
            t = time.perf_counter(); h = fn(); ts.append(time.perf_counter() - t); h.release()
        out[f"{name} {blocks}x{layers}"] = round(float(np.median(ts[20:])) * 1e3, 4)
print(json.dumps(out))
