"""The GPU store path's Python on CPU: the pool made to take its CUDA path, with write_blocks_in_place replaced by
making the kernel's plan array (no kernel). Best of 9 x 1,000 stores, each
with its release. Usage: PYTHONPATH=<tree> python gpu_path_python.py [CASE to profile, e.g. 16x30]"""
import semantic  # noqa
import sys, timeit, cProfile, pstats
import mlx.core as mx
from semantic.benchmarking import cases
from semantic.domain import services

services.writes_through_host = lambda: False
services.BlockPool.writes_in_place = property(lambda self: True)
services.write_blocks_in_place = lambda kp, vp, sources, plan, size: mx.array(plan, dtype=mx.int32)

def main():
    for b, l in [(1, 12), (4, 24), (8, 30), (16, 30)]:
        ctx = cases.context("smollm2-135m", b, l, spare_blocks=b)
        def store():
            cases.extract(ctx).release()
        n = 1000
        best = min(timeit.repeat(store, number=n, repeat=9)) / n * 1e6
        print(f"{b}x{l}: store python {best:.1f} us", flush=True)
        if len(sys.argv) > 1 and f"{b}x{l}" == sys.argv[1]:
            p = cProfile.Profile(); p.enable()
            for _ in range(500): store()
            p.disable(); pstats.Stats(p).sort_stats("tottime").print_stats(25)
main()
