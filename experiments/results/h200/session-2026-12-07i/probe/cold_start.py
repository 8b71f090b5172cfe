"""A fresh process's first store and rebuild against its second (s), per block format: the cold start a user
pays after a restart. argv: geometry layers blocks format [compile: pool.compile_kernels() first, timed]."""
import json, sys, time
t0 = time.time()
import mlx.core as mx
from semantic.benchmarking import cases
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
mx.eval(mx.zeros(4) + 1); mx.synchronize()
geometry, layers, blocks, fmt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = cases.with_block_format(cases.spec_for(geometry, layers), fmt)
from semantic.domain.services import BlockPool
pool = BlockPool(spec, total_blocks=3 * spec.blocks_per_agent(blocks * 256))
caches = cases.random_caches(spec, blocks * 256); mx.synchronize()
res = {"import+caches": round(time.time() - t0, 3)}
def timed(name, fn):
    t = time.perf_counter(); out = fn(); mx.synchronize(); res[name] = round(time.perf_counter() - t, 4); return out
if len(sys.argv) > 5: timed("compile_kernels", pool.compile_kernels)
h1 = timed("store1", lambda: cache_to_blocks(pool, "a", caches, list(range(blocks * 256))))
h2 = timed("store2", lambda: cache_to_blocks(pool, "b", caches, list(range(blocks * 256))))
timed("rebuild1", lambda: mx.eval([c.state[:2] for c in blocks_to_cache(pool, h1)]))
timed("rebuild2", lambda: mx.eval([c.state[:2] for c in blocks_to_cache(pool, h2)]))
timed("rebuild_room1", lambda: mx.eval([c.state[:2] for c in blocks_to_cache(pool, h1, room=16)]))
timed("rebuild_room2", lambda: mx.eval([c.state[:2] for c in blocks_to_cache(pool, h2, room=16)]))
print(geometry, layers, blocks, fmt, json.dumps(res), flush=True)
