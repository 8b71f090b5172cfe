"""The first rebuild with room at each new context length against the next ones (85d9bb1: the row kernels no
longer take the rows per output as a template argument, so a new length must not compile a new kernel).

python probe_first_call.py OUT [FORMAT ...]   # formats: dense, q4 (default both)
"""

import json
import statistics
import sys
import time

import mlx.core as mx

from semantic.application.block_cache import blocks_to_cache
from semantic.benchmarking.cases import token_context


def timed(fn):
    mx.synchronize()
    start = time.perf_counter()
    out = fn()
    mx.eval([(c.keys, c.values) for c in out])
    mx.synchronize()
    return (time.perf_counter() - start) * 1e3


def main(out_dir: str, formats):
    results = {}
    for block_format in formats:
        rows = []
        warm = token_context("smollm2-135m", 5000, 30, block_format=block_format)
        timed(lambda: blocks_to_cache(warm.pool, warm.handle, room=16))  # the one compile per kernel
        for n_tokens in range(300, 300 + 256 * 12, 256):  # 12 lengths, each a new block count
            ctx = token_context("smollm2-135m", n_tokens, 30, block_format=block_format)
            first = timed(lambda: blocks_to_cache(ctx.pool, ctx.handle, room=16))
            again = [timed(lambda: blocks_to_cache(ctx.pool, ctx.handle, room=16)) for _ in range(5)]
            rows.append({"tokens": n_tokens, "first_ms": first, "next_median_ms": statistics.median(again)})
            print(block_format, n_tokens, f"first {first:.3f} ms, next {statistics.median(again):.3f} ms",
                  flush=True)
        results[block_format] = rows
    with open(f"{out_dir}/probe_first_call.json", "w") as f:
        json.dump({"device": str(mx.default_device()), "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["dense", "q4"])
