"""EXP-014 figures: what each block format costs and holds, measured by the asv benchmarks' own code.

    python -m experiments.exp_014_figures --output experiments/results/exp_014/figures-cpu.json

Per format (dense, q8, q4): agents of 4,096 tokens a 1 GiB pool holds; bytes at rest, rebuild and store
time of 8 blocks x 30 layers (smollm2-135m geometry) with the same-run plain copy of the dense bytes as
baseline; warm time to first token on tiny-llama (random weights) resuming 1,024 tokens. On a GPU also
the rebuild of a large context per format (``--large``, default 32 blocks x 48 layers of
gemma3-12b-full, 3 GiB dense), where the bytes read rather than the launches decide the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import semantic  # noqa: F401  (before MLX: its CPU matmuls bind to OpenBLAS, see semantic.cpu_blas)

from benchmarks import bench_quantized as bench
from experiments.records import provenance, write_record


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--large", default="gemma3-12b-full:32x48" if bench.cases.on_gpu() else "",
                        help="GEOMETRY:BLOCKSxLAYERS of the large rebuild ('' to skip; default on a GPU only)")
    args = parser.parse_args(argv)
    cases = bench.cases
    rows = {}
    for fmt in bench.FORMATS:
        row = {}
        for geometry in ("smollm2-135m", "gemma3-12b-sliding"):
            capacity, dense = bench.QuantizedCapacity(), bench.QuantizedCapacity()
            capacity.setup(fmt, geometry)
            dense.setup("dense", geometry)
            row[f"agents_per_gib {geometry}"] = (1 << 30) // capacity.bytes
            row[f"bytes_vs_dense {geometry}"] = capacity.bytes / dense.bytes
        copies = bench.QuantizedRebuild()
        copies.setup(fmt)
        row["bytes_at_rest"] = copies.track_bytes_at_rest(fmt)
        rebuild = cases.time_samples(lambda: cases.reconstruct(copies.ctx), args.repeat, sync=cases.on_gpu())
        store = cases.time_samples(lambda: cases.extract(copies.ctx), args.repeat, sync=cases.on_gpu())
        plain = cases.time_samples(cases.plain_copy(copies.dense_bytes), args.repeat, sync=cases.on_gpu())
        row["rebuild_ms"] = 1e3 * statistics.median(rebuild)
        row["store_ms"] = 1e3 * statistics.median(store)
        row["plain_copy_of_dense_bytes_ms"] = 1e3 * statistics.median(plain)
        ttft = bench.QuantizedWarmTTFT()
        ttft.setup(fmt)
        row["warm_ttft_ms"] = 1e3 * ttft.track_warm(fmt)
        rows[fmt] = row
        print(fmt, row, file=sys.stderr)
    record = {**provenance("experiments.exp_014_figures", argv), "results": rows}
    if args.large:
        record["large_rebuild"] = large_rebuild(args.large, args.repeat)
    write_record(args.output, record)
    print(markdown(record))
    return 0


def large_rebuild(case: str, repeat: int) -> dict:
    """Rebuild p50 / p95 (ms) of one large context per format, and the same-run plain copy of its dense bytes."""
    geometry, size = case.split(":")
    blocks, layers = (int(n) for n in size.split("x"))
    out = {"case": case}
    for fmt in bench.FORMATS:
        ctx = bench.cases.context(geometry, blocks, layers, 0, fmt)
        samples = sorted(bench.cases.time_samples(lambda: bench.cases.reconstruct(ctx), repeat,
                                                  sync=bench.cases.on_gpu()))
        out[fmt] = {"rebuild_p50_ms": 1e3 * statistics.median(samples), "rebuild_max_ms": 1e3 * samples[-1],
                    "bytes_at_rest": ctx.handle.nbytes}
        if fmt == "dense":
            plain = bench.cases.time_samples(bench.cases.plain_copy(ctx.handle.nbytes), repeat,
                                             sync=bench.cases.on_gpu())
            out["plain_copy_of_dense_bytes_ms"] = 1e3 * statistics.median(plain)
        bench.cases.context.cache_clear()  # one large context alive at a time
        print(case, fmt, out[fmt], file=sys.stderr)
    return out


def markdown(record: dict) -> str:
    dense = record["results"]["dense"]
    lines = ["| format | agents / GiB (smollm2-135m, 4K tokens) | agents / GiB (gemma-3-12b) | bytes at rest | "
             "rebuild ms (vs dense) | store ms (vs dense) | plain copy of dense bytes ms | warm TTFT ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in record["results"].items():
        lines.append(
            f"| {name} | {r['agents_per_gib smollm2-135m']} | {r['agents_per_gib gemma3-12b-sliding']} | "
            f"{r['bytes_at_rest'] / 2**20:.1f} MiB ({r['bytes_at_rest'] / dense['bytes_at_rest']:.3f}x) | "
            f"{r['rebuild_ms']:.1f} ({r['rebuild_ms'] / dense['rebuild_ms']:.2f}x) | "
            f"{r['store_ms']:.1f} ({r['store_ms'] / dense['store_ms']:.2f}x) | "
            f"{r['plain_copy_of_dense_bytes_ms']:.1f} | {r['warm_ttft_ms']:.1f} |"
        )
    large = record.get("large_rebuild")
    if large:
        dense = large["dense"]
        lines += ["", f"Large rebuild, {large['case']} (median; plain copy of the dense bytes "
                      f"{large['plain_copy_of_dense_bytes_ms']:.2f} ms):", "",
                  "| format | bytes read | rebuild ms | vs dense |", "|---|---|---|---|"]
        lines += [f"| {fmt} | {large[fmt]['bytes_at_rest'] / dense['bytes_at_rest']:.3f}x | "
                  f"{large[fmt]['rebuild_p50_ms']:.2f} | {large[fmt]['rebuild_p50_ms'] / dense['rebuild_p50_ms']:.2f}x |"
                  for fmt in bench.FORMATS]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
