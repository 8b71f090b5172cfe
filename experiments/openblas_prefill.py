"""Prefill speed of the real SmolLM2-135M-Instruct on a CPU, with and without OpenBLAS, in one run.

    python -m experiments.openblas_prefill [--tokens 256] [--repeat 3] [--out results.json]

OpenBLAS has to be loaded before ``mlx.core`` (``semantic.cpu_blas``), so each configuration runs in its
own child process, one after the other:

* ``reference BLAS, quantized``: MLX's wheel as is, the model as stored (4-bit, what ``mlx_lm.load`` gives);
* ``reference BLAS, float32``: the weights expanded to float32, matmuls on the wheel's netlib BLAS;
* ``OpenBLAS, float32``: what ``semantic.models.load`` does on a CPU where OpenBLAS is installed.

Each child prints prefill tokens/s (median of ``--repeat`` forward passes over ``--tokens`` tokens with a
fresh cache, each ending with ``mx.eval``) and the GFLOP/s of a float32 512x576x1536 matmul.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = (
    ("reference BLAS, quantized", {"SEMANTIC_OPENBLAS": "0"}, False),
    ("reference BLAS, float32", {"SEMANTIC_OPENBLAS": "0"}, True),
    ("OpenBLAS, float32", {}, True),
)


def measure(tokens: int, repeat: int, float32: bool) -> dict:
    from semantic import cpu_blas
    from semantic.models import load

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load("smollm2-135m-instruct", cpu_float32=float32)
    prompt = mx.array([list(range(1000, 1000 + tokens))])
    rates = []
    for _ in range(repeat + 1):  # the first pass compiles and warms up
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        mx.eval(model(prompt, cache=cache))
        rates.append(tokens / (time.perf_counter() - start))
    a, b = mx.random.normal((512, 576)), mx.random.normal((576, 1536))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(10):
        mx.eval(a @ b)
    gflops = 2 * 512 * 576 * 1536 * 10 / (time.perf_counter() - start) / 1e9
    return {"openblas": cpu_blas.OPENBLAS, "tokens_per_s": statistics.median(rates[1:]), "matmul_gflops": gflops}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--child", choices=["quantized", "float32"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.tokens, args.repeat, args.child == "float32")))
        return

    rows = []
    print(f"SmolLM2-135M-Instruct prefill, {args.tokens} tokens, median of {args.repeat}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, env, float32 in CONFIGS:
        child = subprocess.run(
            [sys.executable, "-m", "experiments.openblas_prefill", "--child", "float32" if float32 else "quantized",
             "--tokens", str(args.tokens), "--repeat", str(args.repeat)],
            env=dict(os.environ, **env), capture_output=True, text=True, check=True)
        row = {"config": name, **json.loads(child.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"  {name:<28} {row['tokens_per_s']:8.1f} tokens/s   matmul {row['matmul_gflops']:6.1f} GFLOP/s")
    baseline = rows[0]["tokens_per_s"]
    print(f"OpenBLAS float32 over the wheel as is: {rows[-1]['tokens_per_s'] / baseline:.1f}x")
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"tokens": args.tokens, "repeat": args.repeat, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
