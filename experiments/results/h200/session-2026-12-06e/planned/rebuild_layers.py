"""What a rebuild adds to its kernel, gemma3-12b-full 32x48, dense and q4: (a) the pool's gather evaluated,
(b) the same split into its 48 per-layer views and those evaluated, (c) the same with the 48 cache objects
built between the queueing (``mx.async_eval``) and the evaluation, as ``blocks_to_cache`` does, (d)
``blocks_to_cache`` itself, (e) (c) with the gather queued before it is split. Two rounds alternating them, p50 / p95 ms of 40 synchronized calls after 5
warm-ups. Usage: rebuild_layers.py OUT_DIR [GEOMETRY BLOCKS LAYERS]"""
import json
import sys

import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.block_cache import _split_layers
from semantic.benchmarking import cases

out_dir = sys.argv[1]
case = (sys.argv[2], int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 2 else ("gemma3-12b-full", 32, 48)
contexts = {"dense": cases.context(*case), "q4": cases.context(*case, 0, "q4")}


def steps(ctx):
    rows = ctx.pool.gather_rows(ctx.handle.all_block_ids)
    n_tokens = ctx.handle.num_tokens

    def gather():
        mx.eval(ctx.pool.gather(evaluate=False, rows=rows))

    def split():
        keys, values = ctx.pool.gather(evaluate=False, rows=rows)
        layers = list(zip(_split_layers(keys), _split_layers(values)))
        mx.eval(layers)
        return None

    def split_and_caches():
        keys, values = ctx.pool.gather(evaluate=False, rows=rows)
        layers = list(zip(_split_layers(keys), _split_layers(values)))
        mx.async_eval(layers)
        caches = [adapter.build_layer_cache(None, k, v, n_tokens, own_arrays=True) for k, v in layers]
        mx.eval([(c.keys, c.values) for c in caches])

    def kernel_first():  # the gather queued before its split: its launch does not wait for the 96 views
        keys, values = ctx.pool.gather(evaluate=False, rows=rows)
        mx.async_eval(keys, values)
        layers = list(zip(_split_layers(keys), _split_layers(values)))
        caches = [adapter.build_layer_cache(None, k, v, n_tokens, own_arrays=True) for k, v in layers]
        mx.eval([(c.keys, c.values) for c in caches])

    return {"gather": gather, "split": split, "split_and_caches": split_and_caches, "kernel_first": kernel_first,
            "blocks_to_cache": lambda: cases.reconstruct(ctx)}


rounds = []
for _ in range(2):
    row = {}
    for name, ctx in contexts.items():
        for step, fn in steps(ctx).items():
            samples = cases.time_samples(fn, 40, warmup=5, sync=True)
            row[f"{name}_{step}"] = [round(float(np.percentile(samples, q)) * 1e3, 3) for q in (50, 95)]
    rounds.append(row)
    print(json.dumps(row), flush=True)
json.dump({"case": case, "rounds": rounds}, open(f"{out_dir}/rebuild_layers.json", "w"), indent=1)
