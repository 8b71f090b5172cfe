"""The worst case of a fragmented pool for ``FreeRuns``: every other block free (total / 2 runs of one), then
2,000 scattered ids given back (each merges two neighbours) and one id taken. Usage:
PYTHONPATH=<tree> python scattered_give_back.py LABEL"""
import sys
import time

from semantic.domain.free_runs import FreeRuns

for total in (8000, 100_000, 1_000_000):
    free = FreeRuns(total)
    ids = free.take(total)
    free.give_back(ids[::2])
    start = time.perf_counter()
    free.give_back(ids[1:4000:2])
    give_back_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    free.take(1)
    take_us = (time.perf_counter() - start) * 1e6
    print(f"{sys.argv[1]}: {total} blocks, {len(free.runs())} runs: give back 2,000 scattered ids {give_back_ms:.1f} ms,"
          f" take 1 {take_us:.1f} us", flush=True)
