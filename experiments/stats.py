"""Summary statistics and least-squares lines for experiment samples (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """``n``, ``mean``, ``std`` (sample), ``min``, ``max`` and ``p50``/``p95``/``p99``.

    Percentiles interpolate linearly between order statistics (numpy's default), so
    they stay meaningful for the few samples of a trimmed case.
    """
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        raise ValueError("no samples to summarize")
    summary = {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for q in PERCENTILES:
        summary[f"p{q}"] = float(np.percentile(values, q))
    return summary


@dataclass(frozen=True)
class LineFit:
    """``y = intercept + slope * x`` fitted by ordinary least squares; ``r2`` is the coefficient of determination."""

    slope: float
    intercept: float
    r2: float
    n: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> LineFit:
    """Least-squares line through ``(xs, ys)``; R² = 1 - SS_res / SS_tot (1 when all ``ys`` are equal,
    which the flat fitted line matches exactly)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} x values for {y.size} y values")
    if np.unique(x).size < 2:
        raise ValueError("a line needs at least two distinct x values")
    dx = x - x.mean()
    slope = float((dx * (y - y.mean())).sum() / (dx * dx).sum())
    intercept = float(y.mean() - slope * x.mean())
    ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return LineFit(slope, intercept, r2, int(x.size))
