"""CPU stores (cases.extract) alternated with memcpy of their bytes: p50 of 300 after 200 warm-ups, then a cProfile of 300 stores. Usage: PYTHONPATH=<tree> python store_vs_memcpy.py CASE_INDEX (0 = 1x12, 1 = 4x24, ...)"""
import semantic, cProfile, pstats, time, sys
import mlx.core as mx, numpy as np
from semantic.benchmarking import cases
case = cases.TARGET_CASES[int(sys.argv[1])]
ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=case.blocks)
copy = cases.plain_copy(ctx.nbytes)
for _ in range(200): cases.extract(ctx).release()
s=[]; c=[]
for _ in range(300):
    t=time.perf_counter(); h=cases.extract(ctx); s.append(time.perf_counter()-t); h.release()
    t=time.perf_counter(); copy(); c.append(time.perf_counter()-t)
print(case.name, "store p50 us", np.median(s)*1e6, "copy", np.median(c)*1e6, "ratio", np.median(c)/np.median(s))
p=cProfile.Profile(); p.enable()
for _ in range(300): cases.extract(ctx).release()
p.disable(); pstats.Stats(p).sort_stats("tottime").print_stats(18)
