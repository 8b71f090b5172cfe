"""Store kernel and row gather: HEAD's sources (one load in flight per thread) against IN_FLIGHT-staged ones
(this tree, 8; and 4), in one process, alternated. Per case: single calls (sync before and after, p50/p95 ms)
and bursts (20 launches, one eval + sync: per-launch ms, GPU-bound), against the device copy of the same
bytes; whole stores (cases.extract) and rebuilds with each module swapped in; every variant's written blocks
checked equal to HEAD's. Usage: kernel_probe.py OUT_DIR"""
import importlib.util, json, sys, time
import mlx.core as mx
import numpy as np
import semantic  # noqa
from semantic.adapters import mlx_kernels as new
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.benchmarking import cases
from semantic.domain import services


def load(name):
    spec = importlib.util.spec_from_file_location(name, f".gpu-run/{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod


MODS = {"head": load("old_kernels"), "f4": load("u4_kernels"), "f8": new}


def pct(s):
    return [round(float(np.percentile(s, q)) * 1e3, 4) for q in (50, 95)]


def single(fn, repeat=100, warmup=10, after=None):
    s = []
    for i in range(warmup + repeat):
        mx.synchronize(); t = time.perf_counter(); out = fn(); mx.eval(out); mx.synchronize()
        if i >= warmup: s.append(time.perf_counter() - t)
        if after: after(out)
        del out
    return pct(s)


def burst(fn, k, repeat=12):
    s = []
    for i in range(repeat + 2):
        mx.synchronize(); t = time.perf_counter(); outs = [fn() for _ in range(k)]; mx.eval(outs); mx.synchronize()
        if i >= 2: s.append((time.perf_counter() - t) / k)
        del outs
    return pct(s)


def swap(mod):
    services.write_described_blocks_in_place = mod.write_described_blocks_in_place
    services.write_blocks_in_place = mod.write_blocks_in_place
    services.gather_row_pairs = mod.gather_row_pairs
    services.gather_row_pairs_apart = mod.gather_row_pairs_apart


def main(out_dir):
    results = {}
    for case in cases.TARGET_CASES[: None if cases.on_gpu() else 2]:
        ctx = cases.context(case.geometry, case.blocks, case.layers, spare_blocks=3 * case.blocks)
        pool, size = ctx.pool, ctx.pool.spec.block_size
        n = case.blocks * case.layers
        row = {"MiB": ctx.nbytes / 2**20}
        k = max(2, min(20, (8 << 30) // ctx.nbytes))  # outputs of one burst stay under 8 GiB
        checked = {}
        idsets = {}
        for name, mod in MODS.items():
            ids = pool.allocate(n, "probe-" + name)
            idsets[name] = ids
            writes = []
            for layer, cache in enumerate(ctx.caches):
                keys, values, first_token, offset = adapter.read_layer_cache(cache, whole_buffer=True)
                writes.append((ids[layer * case.blocks:(layer + 1) * case.blocks], 0, keys, values, first_token,
                               offset - first_token))
            w = [pool._checked_write(x) for x in writes]
            described = services._described_writes(w, ids)
            assert described is not None, name
            sources = [(x[2], x[3]) for x in w]
            checked[name] = (mod, sources, ids[0], described)
        src = cases.device_copy_source(ctx.nbytes)
        copy = lambda: cases.device_copy(src)
        for rnd in range(2 if cases.on_gpu() else 0):  # a CPU run checks the rest of this script
            for name, (mod, sources, first, described) in checked.items():
                call = lambda: mod.write_described_blocks_in_place(pool._keys, pool._values, sources, first, *described, size)
                row.setdefault(f"store_kernel_single_{name}", []).append(single(call))
                row.setdefault(f"store_kernel_burst_{name}", []).append(burst(call, k))
            row.setdefault("copy_single", []).append(single(copy))
            row.setdefault("copy_burst", []).append(burst(copy, k))
        # the variants wrote the same bytes into their own blocks
        def blocks(ids):
            a, b = ids[0], ids[-1] + 1
            return np.array(pool._keys[a:b].view(mx.uint16)), np.array(pool._values[a:b].view(mx.uint16))
        ref = blocks(idsets["head"])
        row["store_kernel_equal"] = {name: all(np.array_equal(x, y) for x, y in zip(ref, blocks(ids)))
                                     for name, ids in idsets.items()}
        for name, ids in idsets.items():
            pool.release_blocks(ids, "probe-" + name)
        groups = [ctx.handle.layer_block_ids(layer) for layer in range(case.layers)]
        gathered = {}
        for rnd in range(2):
            for name, mod in MODS.items():
                swap(mod)
                row.setdefault(f"store_{name}", []).append(single(lambda: cases.extract(ctx), after=lambda h: h.release()))
                row.setdefault(f"rebuild_{name}", []).append(single(lambda: [(c.keys, c.values) for c in cases.reconstruct(ctx)]))
                row.setdefault(f"gather_burst_{name}", []).append(burst(lambda: pool.gather(groups, evaluate=False), k))
                if rnd == 0:
                    gathered[name] = [np.array(a.view(mx.uint16)) for a in pool.gather(groups)]
        swap(new)
        row["gather_equal"] = {k: all(np.array_equal(x, y) for x, y in zip(gathered["head"], v)) for k, v in gathered.items()}
        results[case.name] = row
        print(case.name, json.dumps(row), flush=True)
        cases.context.cache_clear(); del ctx, src; mx.clear_cache()
    json.dump(results, open(f"{out_dir}/kernel_probe.json", "w"), indent=1)


main(sys.argv[1])
