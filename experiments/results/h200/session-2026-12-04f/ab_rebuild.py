"""Rebuild and store times of two trees of semantic alternated in fresh processes (old: ``8655f71``, the
commit before the door checks; new: this checkout), to tell a change from the shared GPU's noise.

python ab_rebuild.py OUT ROUNDS OLD_TREE NEW_TREE      # runs itself per side with: python ab_rebuild.py --one
"""

import json
import os
import statistics
import subprocess
import sys
import time

CASES = (("smollm2-135m", 1, 12), ("smollm2-135m", 4, 24), ("smollm2-135m", 8, 30), ("smollm2-135m", 16, 30))


def one() -> dict:
    import mlx.core as mx

    from semantic.benchmarking import cases

    def timed(fn, repeat=200, warmup=20):
        out = []
        for i in range(warmup + repeat):
            mx.synchronize()
            start = time.perf_counter()
            result = fn()
            mx.eval(cases._arrays(result))
            mx.synchronize()
            out.append((time.perf_counter() - start) * 1e3)
            cases._release(result)
        out = sorted(out[warmup:])
        return [round(statistics.median(out), 4), round(out[int(0.95 * len(out))], 4)]

    row = {}
    for geometry, blocks, layers in CASES:
        ctx = cases.context(geometry, blocks, layers, blocks)
        name = f"{blocks}x{layers}"
        row[f"rebuild {name}"] = timed(lambda: cases.reconstruct(ctx))
        row[f"store {name}"] = timed(lambda: cases.extract(ctx))
        cases.context.cache_clear()
    return row


def main(out_dir: str, rounds: int, old: str, new: str) -> None:
    results = {"old": [], "new": []}
    for r in range(rounds):
        for side, tree in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
            proc = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(side, results[side][-1], flush=True)
    with open(f"{out_dir}/ab_rebuild.json", "w") as f:
        json.dump(results, f, indent=1)
    for key in results["old"][0]:
        print(key, "old p50", [r[key][0] for r in results["old"]], "new p50", [r[key][0] for r in results["new"]])


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(json.dumps(one()))
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
