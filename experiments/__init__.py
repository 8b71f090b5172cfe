"""Runnable experiment plans: ``python -m experiments.exp_006_benchmark`` (EXP-006, cache reconstruction
performance). Results go to ``experiments/results/``; ``docs/results/`` holds the written-up runs."""
