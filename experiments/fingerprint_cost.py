"""What ``model_fingerprint`` costs now that it hashes every byte of every weight.

    python -m experiments.fingerprint_cost                       # smollm2-135m local preset (bfloat16)
    python -m experiments.fingerprint_cost --preset tiny-llama --repeats 10

Prints the model's size, the median and minimum time of ``model_fingerprint(model)`` and of
``model_fingerprint(model, tokenizer)``, and, as the same-run baseline, one SHA-256 pass over the same
bytes on one thread (``hashlib.sha256`` of each weight in turn). The weights are evaluated before
timing, so only hashing and the probe forward pass ``ModelCacheSpec.from_model`` makes are timed.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

from semantic.persistence import model_fingerprint  # first: semantic loads OpenBLAS before MLX
from semantic.persistence.file_format import byte_views
from semantic.testing.local_models import PRESETS, load_local_model

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402


def timed(call, repeats: int):
    call()  # warm-up: first touches of the weights' pages
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = load_local_model(args.preset)
    params = [p for _, p in tree_flatten(model.parameters())]
    mx.eval(params)
    n_params, n_bytes = sum(p.size for p in params), sum(p.nbytes for p in params)
    views = byte_views(params)
    rows = {
        "model_fingerprint(model)": timed(lambda: model_fingerprint(model), args.repeats),
        "model_fingerprint(model, tokenizer)": timed(lambda: model_fingerprint(model, tokenizer), args.repeats),
        "baseline: sha256 of the same bytes, 1 thread": timed(
            lambda: [hashlib.sha256(v).digest() for v in views], args.repeats),
    }
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters, {n_bytes / 1e6:.0f} MB, "
          f"{args.repeats} repeats after a warm-up")
    for name, (median, best) in rows.items():
        print(f"  {name:48s} median {median:.3f} s   min {best:.3f} s")


if __name__ == "__main__":
    main()
