"""Device probe: where a small rebuild (views, 1x12) and a small store (1x12, 4x24, 8x30) spend their time.

    PYTHONPATH=$PWD python experiments/results/h200/session-2026-12-04b/probe7.py OUT_DIR [ROUNDS]

Per part, p50 / p95 ms over 100 calls after 10 warm-ups, each timer between two ``mx.synchronize()``;
ROUNDS rounds alternate the parts. "python" parts are the same call with the library's ``mx.eval`` /
``mx.async_eval`` timed apart (their time subtracted): Python and graph building alone.
"""
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_kernels
from semantic.application import block_cache
from semantic.benchmarking import cases
from semantic.domain import services

out = Path(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
evals = [0.0]


class TimedMx:
    """``mx`` with its evaluations timed (and synchronised), the time added to ``evals[0]``."""

    def __getattr__(self, name):
        return getattr(mx, name)

    def eval(self, *a):
        t0 = time.perf_counter(); mx.eval(*a); mx.synchronize(); evals[0] += time.perf_counter() - t0

    def async_eval(self, *a):
        t0 = time.perf_counter(); mx.eval(*a); mx.synchronize(); evals[0] += time.perf_counter() - t0


def timed(fn, repeat=100, warmup=10, minus_evals=False):
    samples = []
    for i in range(warmup + repeat):
        mx.synchronize()
        evals[0] = 0.0
        t0 = time.perf_counter()
        r = fn()
        if isinstance(r, list):
            mx.eval([c.state[:2] for c in r])
        mx.synchronize()
        took = time.perf_counter() - t0 - (evals[0] if minus_evals else 0.0)
        if hasattr(r, "release") and not r.released:
            r.release()
        del r
        if i >= warmup:
            samples.append(took)
    return [round(float(np.percentile(samples, q)) * 1e3, 4) for q in (50, 95)]


def with_timed_evals(fn):
    def run():
        block_cache.mx = services.mx = TimedMx()
        try:
            return fn()
        finally:
            block_cache.mx = services.mx = mx
    return run


results = {"device": str(mx.default_device()), "rounds": []}
rebuild_ctx = cases.context("smollm2-135m", 1, 12, 1)
keys, values = rebuild_ctx.pool._keys, rebuild_ctx.pool._values
first = rebuild_ctx.handle.layer_block_ids(0)[0]
stores = {name: cases.context("smollm2-135m", b, layers, b) for name, b, layers in
          (("1x12", 1, 12), ("4x24", 4, 24), ("8x30", 8, 30))}
copies = {name: cases.plain_copy(ctx.nbytes) for name, ctx in stores.items()}


def pack_only(ctx):
    """The pack kernel over every block of the context's caches (the store's kernel, no pool write)."""
    size = ctx.spec.block_size
    sources = [block_cache.adapter.read_layer_cache(c, whole_buffer=True)[:2] for c in ctx.caches]
    n = ctx.handle.num_tokens // size
    plan = np.array([(s, b * size, 0, size) for s in range(len(sources)) for b in range(n)], np.int32)
    return lambda: mx.eval(mlx_kernels.pack_blocks(sources, plan, size))


parts = {
    "sync_only": lambda: None,
    "one_slice_eval": lambda: mx.eval(keys[first : first + 1]),
    "views_floor_split12x2": lambda: mx.eval(mx.split(keys[first : first + 12], 12, axis=0),
                                             mx.split(values[first : first + 12], 12, axis=0)),
    "rebuild_1x12": lambda: cases.reconstruct(rebuild_ctx),
}
for name, ctx in stores.items():
    parts[f"store_{name}"] = (lambda c: lambda: cases.extract(c))(ctx)
    if cases.on_gpu():
        parts[f"pack_kernel_only_{name}"] = pack_only(ctx)
    parts[f"device_copy_{name}"] = copies[name]
for r in range(rounds):
    row = {name: timed(fn) for name, fn in parts.items()}
    row["rebuild_1x12_python"] = timed(with_timed_evals(lambda: cases.reconstruct(rebuild_ctx)), minus_evals=True)
    for name, ctx in stores.items():
        row[f"store_{name}_python"] = timed(with_timed_evals((lambda c: lambda: cases.extract(c))(ctx)),
                                            minus_evals=True)
    results["rounds"].append(row)
    print(json.dumps(row), flush=True)

# Profiles with the library's evaluations as their own (TimedMx) entries: the rest is Python and graph building.
block_cache.mx = services.mx = TimedMx()
text = ""
for name, ctx in stores.items():
    profile = cProfile.Profile()
    for _ in range(30):
        profile.enable(); h = cases.extract(ctx); mx.synchronize(); profile.disable(); h.release()
    s = io.StringIO()
    pstats.Stats(profile, stream=s).sort_stats("tottime").print_stats(25)
    text += f"==== store {name}, 30 calls\n" + s.getvalue()
profile = cProfile.Profile()
for _ in range(100):
    profile.enable(); c = cases.reconstruct(rebuild_ctx); mx.synchronize(); profile.disable(); del c
s = io.StringIO()
pstats.Stats(profile, stream=s).sort_stats("tottime").print_stats(25)
text += "==== rebuild 1x12, 100 calls\n" + s.getvalue()
block_cache.mx = services.mx = mx
(out / "probe7_profile.txt").write_text(text)
(out / "probe7.json").write_text(json.dumps(results, indent=1))
