"""CPU rebuild and store of 8 blocks x 30 layers (smollm2-135m geometry, 45 MiB dense) per block format: p50 ms of 9
calls after 2 warm-ups (cases.reconstruct, cases.extract). Usage: PYTHONPATH=<tree> python q_cpu.py LABEL"""
import semantic, sys
import numpy as np
from semantic.benchmarking import cases
out = []
for fmt in ("dense", "q8", "q4"):
    ctx = cases.context("smollm2-135m", 8, 30, 8, fmt)
    r = cases.time_samples(lambda: cases.reconstruct(ctx), 9, warmup=2)
    s = cases.time_samples(lambda: cases.extract(ctx), 9, warmup=2)
    out.append(f"{fmt} rebuild {np.median(r)*1e3:.1f} store {np.median(s)*1e3:.1f}")
print(sys.argv[1], " | ".join(out), flush=True)
