"""What the pool's watches cost (f92ff6e) against the finalizers before (4761aab), CPU: medians of 2,500 calls
(after 500) of a 1x12 rebuild (its pin is watched), a share and its release, a store and its release.
Usage: PYTHONPATH=<tree> python watch_cost.py; run alternately on a `git archive` of each tree."""
import semantic, time, numpy as np, mlx.core as mx
from semantic.benchmarking import cases
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
case = cases.TARGET_CASES[0]
ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
pool, handle = ctx.pool, ctx.handle
for name, fn in [("rebuild", lambda: mx.eval([(c.keys, c.values) for c in blocks_to_cache(pool, handle)])),
                 ("share+release", lambda: pool.share(handle).release()),
                 ("store+release", lambda: cases.extract(ctx).release())]:
    ts = []
    for i in range(3000):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    print(name, f"{np.median(ts[500:])*1e6:.1f} us")
