"""Small statistics helpers shared by the load generators and the report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def percentiles(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p95/p99 of ``values`` (NaN when empty, so that a failed run shows as such)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {f"p{p}": float("nan") for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
