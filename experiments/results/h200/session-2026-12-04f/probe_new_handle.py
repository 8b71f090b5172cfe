"""Where a rebuild of a handle never rebuilt before spends its extra time (each turn of a conversation stores
a new handle, so every real resume is such a first call; the warm-resume benchmarks resume one handle).

In one pool (smollm2-135m geometry, 30 layers, room 16), for twelve context lengths, each timer between two
synchronisations:
- ``new``: the first rebuild of a freshly stored handle (new handle, new length: new plan, new buffer sizes);
- ``again``: the same handle rebuilt again (median of 5: plan memoised, buffers cached);
- ``shared``: a ``share()`` of it rebuilt once each (median of 5: new plan, sizes already seen);
- ``plan``: ``_gather_plan`` alone for another share, its row arrays evaluated (median of 5);
- ``rows_upload``: ``mx.array`` of the same NumPy row index, evaluated (median of 5).

python probe_new_handle.py OUT [FORMAT ...]   # formats: dense, q4 (default both)
"""

import json
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from semantic.application.block_cache import _gather_plan, blocks_to_cache, cache_to_blocks
from semantic.benchmarking.cases import random_caches, spec_for, with_block_format
from semantic.domain.services import BlockPool

ROOM = 16
LENGTHS = range(300, 300 + 256 * 12, 256)


def timed(fn):
    mx.synchronize()
    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return (time.perf_counter() - start) * 1e3


def rebuilt(pool, handle):
    return [(c.keys, c.values) for c in blocks_to_cache(pool, handle, room=ROOM)]


def median_of(fn, n=5):
    return statistics.median(fn() for _ in range(n))


def main(out_dir: str, formats):
    results = {}
    for block_format in formats:
        spec = with_block_format(spec_for("smollm2-135m", 30), block_format)
        pool = BlockPool(spec, total_blocks=sum(spec.blocks_per_agent(n + ROOM) for n in LENGTHS) + 64)
        warm = cache_to_blocks(pool, "warm", random_caches(spec, 200), list(range(200)))
        timed(lambda: rebuilt(pool, warm))
        rows = []
        for n_tokens in LENGTHS:
            caches = random_caches(spec, n_tokens, seed=n_tokens)
            mx.eval([(c.keys, c.values) for c in caches])
            handle = cache_to_blocks(pool, f"a{n_tokens}", caches, list(range(n_tokens)))
            del caches
            row = {"tokens": n_tokens, "new_ms": timed(lambda: rebuilt(pool, handle)),
                   "again_ms": median_of(lambda: timed(lambda: rebuilt(pool, handle)))}

            def shared_once(make):
                other = handle.share()
                try:
                    return timed(lambda: make(other))
                finally:
                    other.release()

            row["shared_ms"] = median_of(lambda: shared_once(lambda h: rebuilt(pool, h)))
            held = spec.blocks_for_tokens(n_tokens + ROOM)
            row["plan_ms"] = median_of(lambda: shared_once(
                lambda h: [g.rows for g in _gather_plan(pool, h, n_tokens, True, held) if g.rows is not None]))
            index = np.asarray(_gather_plan(pool, handle, n_tokens, True, held)[0].rows)
            row["rows_upload_ms"] = median_of(lambda: timed(lambda: mx.array(index)))
            rows.append(row)
            print(block_format, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        results[block_format] = rows
    with open(f"{out_dir}/probe_new_handle.json", "w") as f:
        json.dump({"device": str(mx.default_device()), "room": ROOM, "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["dense", "q4"])
