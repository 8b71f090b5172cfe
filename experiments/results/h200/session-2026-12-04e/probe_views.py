"""Views made on the host stream (this commit) against views made on the default stream (before), one-block
rebuilds without room, alternated in rounds; then a cProfile of the 4x24 store.

python probe_views.py OUT ROUNDS
"""

import cProfile
import io
import json
import pstats
import sys

import numpy as np
import mlx.core as mx

from semantic.benchmarking import cases
from semantic.domain.services import BlockPool

NEW = BlockPool.block_views


def old_views(self, block_ids, lo, hi):  # the code before: the views made on the default stream
    return self._sliced_views(self._checked_ids(block_ids), lo, hi, hi - lo == self.spec.block_size)


def stats(samples):
    ms = np.array(samples) * 1e3
    return round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4)


def main(out_dir: str, rounds: int):
    contexts = {name: cases.context(geometry, 1, layers) for name, geometry, layers in
                [("smollm2 1x12", "smollm2-135m", 12), ("smollm2 1x30", "smollm2-135m", 30),
                 ("gemma3-12b-sliding 1x24", "gemma3-12b-sliding", 24)]}
    results = {name: {"new": [], "old": []} for name in contexts}
    results["sync floor"] = []
    for r in range(rounds):
        results["sync floor"].append(stats(cases.time_samples(lambda: None, 200, sync=True)))
        for name, ctx in contexts.items():
            for side, views in (("old", old_views), ("new", NEW)) if r % 2 else (("new", NEW), ("old", old_views)):
                BlockPool.block_views = views
                results[name][side].append(stats(cases.time_samples(lambda: cases.reconstruct(ctx), 200, sync=True)))
        BlockPool.block_views = NEW
        latest = {k: (v[-1] if k == "sync floor" else {s: v[s][-1] for s in v}) for k, v in results.items()}
        print(json.dumps({"round": r, **latest}), flush=True)
    ctx = cases.context("smollm2-135m", 4, 24, 4)
    cases.time_samples(lambda: cases.extract(ctx), 20, sync=True)
    profile = cProfile.Profile()
    profile.enable()
    store = cases.time_samples(lambda: cases.extract(ctx), 100, sync=True)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(30)
    results["store 4x24 under cProfile"] = stats(store)
    with open(f"{out_dir}/probe_views.json", "w") as f:
        json.dump(results, f, indent=1)
    with open(f"{out_dir}/store_4x24_profile.txt", "w") as f:
        f.write(text.getvalue())
    print(text.getvalue()[:6000])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
