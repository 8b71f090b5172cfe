"""What a store costs in Python besides its copies: ``cache_to_blocks`` and the handle's release.

    python -m experiments.store_cost                 # every case
    python -m experiments.store_cost warm --show     # one case, with its cProfile by tottime

Cases, smollm2-135m geometry: ``4x24``, ``8x30``, ``32x48`` (blocks x layers; ``cases.extract``, every
block written) and ``warm``, the store after a warm resume (8,209 tokens x 30 layers from a source of 8,192:
960 blocks shared, 30 written). Per case, 200 calls of store + release:

* cProfile: per-call cumtime of ``cache_to_blocks``, and of it less ``BlockPool._write_checked`` (the copies,
  after the writes' checks; both a store's ``write_new`` and ``write_many`` end there);
* timeit with ``_write_checked`` a no-op on the pool (min and median of 7 x 200 calls): the bookkeeping alone,
  which cProfile inflates. The machine is shared: compare commits by alternating runs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from semantic.application.block_cache import cache_to_blocks  # first: semantic loads OpenBLAS before MLX
from semantic.benchmarking import cases


def store_case(blocks: int, layers: int):
    ctx = cases.context("smollm2-135m", blocks, layers, blocks)
    return ctx.pool, lambda: cases.extract(ctx)


def warm_case():
    ctx = cases.token_context("smollm2-135m", 8192, 30, spare_blocks=2)
    caches = cases.random_caches(ctx.spec, 8209, seed=1)
    tokens = ctx.tokens + list(range(17))
    return ctx.pool, lambda: cache_to_blocks(ctx.pool, "warm", caches, tokens, source=ctx.handle, reused_tokens=8192)


CASES = {"4x24": lambda: store_case(4, 24), "8x30": lambda: store_case(8, 30),
         "32x48": lambda: store_case(32, 48), "warm": warm_case}


def store_and_release(store) -> None:
    store().release()


def timed(store, calls: int = 200, rounds: int = 7):
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            store_and_release(store)
        per_call.append((time.perf_counter() - start) / calls * 1e3)
    per_call.sort()
    return per_call[0], per_call[len(per_call) // 2]


def profiled(store, calls: int = 200):
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        store_and_release(store)
    profile.disable()
    stats = pstats.Stats(profile)

    def cumtime(name: str) -> float:
        return sum(row[3] for key, row in stats.stats.items() if key[2] == name) / calls * 1e3

    return cumtime("cache_to_blocks"), cumtime("cache_to_blocks") - cumtime("_write_checked"), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    parser.add_argument("--show", action="store_true", help="print each case's profile by tottime")
    args = parser.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
    for name in args.cases or CASES:
        pool, store = CASES[name]()
        for _ in range(20):
            store_and_release(store)
        total, besides, stats = profiled(store)
        pool._write_checked = lambda writes, ids, **options: None
        fastest, median = timed(store)
        del pool._write_checked
        print(f"{name:6s} cProfile cache_to_blocks {total:.3f} ms/call, besides the copies {besides:.3f} | "
              f"bookkeeping (no-op writes) timeit min {fastest:.3f} median {median:.3f} ms/call", flush=True)
        if args.show:
            out = io.StringIO()
            stats.stream = out
            stats.sort_stats("tottime").print_stats(30)
            print(out.getvalue())


if __name__ == "__main__":
    main()
