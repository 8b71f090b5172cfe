"""Rebuild with the row kernel precompiled (NVRTC) against the same kernel compiled by MLX, same process,
interleaved rounds; p50 / p95 ms over 100 calls per round. argv: rounds."""
import json, sys, time
import numpy as np
import mlx.core as mx
from semantic.adapters import mlx_kernels
from semantic.benchmarking import cases
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain.services import BlockPool
precompiled = mlx_kernels._row_pair_kernel
by_mlx = lambda n: precompiled(n)._mlx_kernel()
out = {}
for blocks, layers in ((1, 12), (4, 24), (8, 30), (16, 30)):
    spec = cases.spec_for("smollm2-135m", layers)
    pool = BlockPool(spec, total_blocks=3 * spec.blocks_per_agent(blocks * 256))
    handle = cache_to_blocks(pool, "a", cases.random_caches(spec, blocks * 256), list(range(blocks * 256)))
    for side in ("precompiled", "mlx") * int(sys.argv[1]):
        mlx_kernels._row_pair_kernel = precompiled if side == "precompiled" else by_mlx
        times = []
        for i in range(110):
            t = time.perf_counter()
            caches = blocks_to_cache(pool, handle)
            mx.eval([c.state[:2] for c in caches]); mx.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
            del caches
        t = np.array(times[10:])
        out.setdefault(f"{blocks}x{layers}", {}).setdefault(side, []).append(
            (round(float(np.percentile(t, 50)), 3), round(float(np.percentile(t, 95)), 3)))
    print(f"{blocks}x{layers}", json.dumps(out[f"{blocks}x{layers}"]), flush=True)
