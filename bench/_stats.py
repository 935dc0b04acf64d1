"""Small helpers shared by the benchmarks: percentile summaries and output."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pydisco._percentiles import percentile as percentile  # the package's one helper, for the benchmarks too


def summary_us(values_ns: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values_ns, 50) / 1e3,
        "p99": percentile(values_ns, 99) / 1e3,
        "max": max(values_ns) / 1e3 if values_ns else math.nan,
    }


def emit(rows: list[tuple[str, str]], figures: dict[str, Any], as_json: bool) -> None:
    """Print a two-column table, or the figures as one JSON object."""
    if as_json:
        print(json.dumps(figures, indent=2, sort_keys=True))
        return
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def decoding_rate(stamps: Sequence[Sequence[float]]) -> float:
    """Aggregate tokens/s while every sequence decodes: tokens stamped in [last first token,
    first last token], over that window (the window's first tokens are its start, not counted)."""
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    if len(stamps) == 1:
        return (len(stamps[0]) - 1) / (end - start)
    tokens = sum(1 for s in stamps for t in s if start < t <= end)
    return tokens / (end - start)
