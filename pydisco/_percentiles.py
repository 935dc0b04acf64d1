"""The one percentile helper of pydisco and its benchmarks, on ``statistics.quantiles``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (a whole number 0..100) of ``values``, interpolated linearly
    between the two nearest values (``statistics.quantiles``' inclusive method, numpy's
    default); nan for no values."""
    if not (isinstance(p, int) and 0 <= p <= 100):
        raise ValueError(f"a percentile is a whole number in 0..100, got {p!r}")
    if not values:
        return math.nan
    if p == 0:
        return float(min(values))
    if p == 100:
        return float(max(values))
    if len(values) == 1:  # quantiles() wants two values before Python 3.13
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]
