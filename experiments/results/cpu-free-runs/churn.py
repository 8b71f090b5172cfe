"""How often an allocation is one run of consecutive block ids while agents come and go, and what allocating and
giving back cost, for whichever tree PYTHONPATH names. Seeded churn: 20,000 steps, each releasing a random held
allocation (half the time, or when fewer than 500 blocks are free) or allocating 12, 24, 96, 240 or 480 blocks
(one agent's new blocks over 12 to 30 layers); pools of 2,000 and 8,000 blocks. Then the median of 2,000
allocations of 480 blocks each given back at once, in a fresh pool and in the churned one.
Usage: PYTHONPATH=<tree> python churn.py LABEL"""
import collections
import random
import sys
import time

import semantic
import numpy as np

from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec

SPEC = ModelCacheSpec.preset("smollm2-135m").with_layers(1)


def n_runs(ids):
    return 1 + sum(1 for a, b in zip(ids, ids[1:]) if b != a + 1)


def churn(pool, rng, held, steps=20000):
    runs = collections.Counter()
    for _ in range(steps):
        if held and (rng.random() < 0.5 or pool.free_blocks < 500):
            pool.release_blocks(held.pop(rng.randrange(len(held))), "a")
        else:
            n = rng.choice([12, 24, 96, 240, 480])
            if n > pool.free_blocks:
                continue
            ids = pool.allocate(n, "a")
            r = n_runs(ids)
            runs["1" if r == 1 else "2-5" if r <= 5 else "6-20" if r <= 20 else ">20"] += 1
            held.append(ids)
    return runs


def allocate_and_give_back(pool, n=480, repeat=2000):
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        pool.release_blocks(pool.allocate(n, "b"), "b")
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e6


print(sys.argv[1], semantic.__file__)
for total in (2000, 8000):
    pool = BlockPool(SPEC, total_blocks=total)
    fresh_us = allocate_and_give_back(pool)
    runs = churn(pool, random.Random(0), held := [])
    pool.check_invariants()
    share = {k: f"{100 * v / sum(runs.values()):.0f}%" for k, v in sorted(runs.items())}
    print(f"{total} blocks: runs per allocation {share}; allocate 480 + give back: fresh pool "
          f"{fresh_us:.1f} us, churned {allocate_and_give_back(pool):.1f} us", flush=True)
