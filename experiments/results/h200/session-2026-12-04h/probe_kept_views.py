"""What a 1 x 12 rebuild from views the pool keeps costs on the GPU, part by part (smollm2-135m geometry):
a synchronisation alone, an evaluation of 24 evaluated arrays then a synchronisation, ``blocks_to_cache``
without any evaluation or synchronisation (its Python), and the rebuild as EXP-006 times it.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04h/probe_kept_views.py OUT_DIR
"""
import json
import sys
import time

import mlx.core as mx
import numpy as np

from semantic.application.block_cache import blocks_to_cache
from semantic.benchmarking import cases


def percentiles(samples):
    return [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]


def python_only(fn, repeat):
    samples = []
    for _ in range(repeat + 5):
        mx.synchronize()
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
        del out
    return samples[5:]


ctx = cases.context("smollm2-135m", 1, 12)
rebuilt = blocks_to_cache(ctx.pool, ctx.handle)
available = [a for c in rebuilt for a in c.state[:2]]
print("kept views:", ctx.pool.writes_in_place, file=sys.stderr)
result = {}
for round_ in range(3):
    for name, fn in {"synchronize_only": lambda: None,
                     "eval_24_evaluated": lambda: mx.eval(available),
                     "rebuild": lambda: cases.reconstruct(ctx)}.items():
        result.setdefault(name, []).append(percentiles(cases.time_samples(fn, 300, sync=True)))
    result.setdefault("rebuild_python_only", []).append(percentiles(python_only(lambda: cases.reconstruct(ctx), 300)))
print(json.dumps(result, indent=1))
with open(f"{sys.argv[1]}/probe_kept_views.json", "w") as f:
    json.dump(result, f, indent=1)
