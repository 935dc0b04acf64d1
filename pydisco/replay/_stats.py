"""Percentiles in bounded memory: a replay of a million requests keeps a histogram per figure,
not every value, so its memory stays flat."""

from __future__ import annotations

import math

__all__ = ["Histogram"]


class Histogram:
    """Values >= 0 in log-spaced bins of relative width ``resolution`` (0.5 %: a percentile is
    within 0.5 % of the exact one) above ``floor``; values below ``floor`` (and 0) share one
    bin. Exact count, mean, minimum and maximum."""

    def __init__(self, *, resolution: float = 0.005, floor: float = 1e-6) -> None:
        self._log_base = math.log1p(resolution)
        self._floor = floor
        self._bins: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.minimum = math.inf
        self.maximum = -math.inf

    def add(self, value: float) -> None:
        if not value >= 0 or math.isinf(value):
            raise ValueError(f"a histogram takes finite values >= 0, got {value!r}")
        key = -1 if value < self._floor else int(math.log(value / self._floor) / self._log_base)
        self._bins[key] = self._bins.get(key, 0) + 1
        self.count += 1
        self.total += value
        self.minimum = min(self.minimum, value)
        self.maximum = max(self.maximum, value)

    def extend(self, values: object) -> None:
        for v in values:  # type: ignore[attr-defined]
            self.add(v)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0–1): the middle of the bin holding it, clamped to [min, max]."""
        if not self.count:
            return math.nan
        rank = q * (self.count - 1)
        seen = 0
        for key in sorted(self._bins):
            seen += self._bins[key]
            if seen > rank:
                if key < 0:
                    value = 0.0 if self.minimum == 0 else self.minimum
                else:
                    value = self._floor * math.exp((key + 0.5) * self._log_base)
                return min(self.maximum, max(self.minimum, value))
        return self.maximum

    def share_at_least(self, threshold: float) -> float:
        """Fraction of values >= ``threshold`` (to the bin)."""
        if not self.count:
            return math.nan
        key = -1 if threshold < self._floor else int(math.log(threshold / self._floor) / self._log_base)
        return sum(n for k, n in self._bins.items() if k >= key) / self.count

    def summary(self, quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float | int]:
        out: dict[str, float | int] = {"n": self.count, "mean": self.mean}
        for q in quantiles:
            out[f"p{round(q * 100):d}"] = self.quantile(q)
        out["max"] = self.maximum if self.count else math.nan
        return out
