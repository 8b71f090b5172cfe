"""Runnable experiment plans: ``python -m experiments.exp_006_benchmark`` (EXP-006, cache reconstruction
performance). Results go to ``experiments/results/``; ``docs/results/`` holds the written-up runs."""

import semantic  # noqa: F401,E402  (first: on a Linux CPU it loads OpenBLAS, which must precede mlx.core)
