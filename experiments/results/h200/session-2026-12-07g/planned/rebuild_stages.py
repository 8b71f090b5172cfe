"""Why a 4x24 rebuild can take longer than an 8x30 one on a GPU (21st session's H100: p50 0.290 against 0.160).
Planned, not yet run. Alternates the two cases (and 1x12, 16x30) in ROUNDS rounds; per case, p50 / p95 ms of
REPEAT synchronized calls after 10 warm-ups: the whole ``blocks_to_cache``, the gather kernel alone with its rows
made once (``pool.gather(rows=...)``), the same plus the per-layer split, and the device copy of the same bytes.
Then a cProfile of 200 rebuilds per case (tottime, top 15).

    python experiments/results/h200/session-2026-12-07g/planned/rebuild_stages.py OUT_JSON [ROUNDS] [REPEAT]
"""
import cProfile
import io
import json
import pstats
import sys

from semantic.application.block_cache import _split_layers  # first: semantic loads OpenBLAS before MLX
from semantic.benchmarking import cases

import mlx.core as mx  # noqa: E402

from experiments.gpu_kernel_choices import percentiles  # noqa: E402

out, rounds, repeat = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3, \
    int(sys.argv[3]) if len(sys.argv) > 3 else 100
points = {"1x12": (1, 12), "4x24": (4, 24), "8x30": (8, 30), "16x30": (16, 30)}
contexts = {name: cases.context("smollm2-135m", blocks, layers) for name, (blocks, layers) in points.items()}


def stages(ctx):
    rows = ctx.pool.gather_rows(ctx.handle.all_block_ids)
    copy = cases.plain_copy(ctx.nbytes)
    return {"rebuild": lambda: cases.reconstruct(ctx),
            "gather_kernel": lambda: mx.eval(ctx.pool.gather(rows=rows)),
            "gather_and_split": lambda: mx.eval([_split_layers(a) for a in ctx.pool.gather(rows=rows)]),
            "device_copy": copy}


timed = {name: stages(ctx) for name, ctx in contexts.items()}
record = {"rounds": []}
for r in range(rounds):
    row = {name: {stage: percentiles(fn, repeat, 10) for stage, fn in parts.items()} for name, parts in timed.items()}
    record["rounds"].append(row)
    print(r, json.dumps(row), flush=True)
record["profiles"] = {}
for name, ctx in contexts.items():
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        caches = cases.reconstruct(ctx)
        mx.eval([c.state[:2] for c in caches])
        del caches
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
    record["profiles"][name] = text.getvalue()
json.dump(record, open(out, "w"), indent=1)
