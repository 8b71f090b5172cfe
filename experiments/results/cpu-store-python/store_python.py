"""The store's Python on CPU, no copying: cache_to_blocks with the pool's write_many doing only its checks
and plan (what precedes the CUDA kernel), best of 7 x 2,000 calls."""
import semantic  # noqa
import sys, timeit
from semantic.benchmarking import cases
from semantic.domain import services

def main():
    for b, l in [(1, 12), (4, 24), (16, 30)]:
        ctx = cases.context("smollm2-135m", b, l, spare_blocks=b)
        pool = ctx.pool
        def checks_and_plan(writes):
            checked = [pool._checked_write(w) for w in writes]
            services._pack_plan(checked, pool.spec.block_size)
        pool.write_many = checks_and_plan
        def store():
            cases.extract(ctx).release()
        n = 2000
        best = min(timeit.repeat(store, number=n, repeat=7)) / n * 1e6
        pool.write_many = lambda writes: None
        bare = min(timeit.repeat(store, number=n, repeat=7)) / n * 1e6
        print(f"{b}x{l}: store without the copy {best:.1f} us, of which bookkeeping (no checks/plan) {bare:.1f} us")
        del pool.write_many
main()
