"""How often does Python's GC run inside a timed rebuild sample (EXP-006 cases, CPU)? Output: gc_in_timed_samples.txt"""
import gc, time, statistics, sys
import mlx.core as mx
from semantic.benchmarking import cases
hits = []
gc.callbacks.append(lambda phase, info: hits.append(info["generation"]) if phase == "start" else None)
for geometry, blocks, layers in (("smollm2-135m", 1, 12), ("smollm2-135m", 4, 24), ("smollm2-135m", 8, 30)):
    ctx = cases.context(geometry, blocks, layers)
    for mode in ("gc on", "gc off", "gc on", "gc off"):
        (gc.disable if mode == "gc off" else gc.enable)()
        samples, with_gc = [], 0
        for i in range(310):
            del hits[:]
            t = time.perf_counter(); out = cases.reconstruct(ctx); mx.eval([c.state[:2] for c in out]); dt = time.perf_counter() - t
            del out
            if i >= 10:
                samples.append(dt); with_gc += bool(hits)
        gc.enable()
        s = sorted(samples); p50, p95 = s[len(s)//2], s[int(len(s)*0.95)]
        print(f"{blocks}x{layers} {mode}: p50 {p50*1e3:.3f} p95 {p95*1e3:.3f} ratio {p95/p50:.2f}  samples with a collection: {with_gc}/300", flush=True)
