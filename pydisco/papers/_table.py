"""A paper's table as plain data (what the report prints and ``--json`` carries), and the small
arithmetic the tables share."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

__all__ = ["PaperTable", "cut", "median_and_range", "ms", "pct", "share"]


@dataclasses.dataclass(frozen=True)
class PaperTable:
    """``key``: the paper (``disco``, ``pd``, ``andes``, ``slice``). ``compares``: what the
    table puts side by side, in a sentence or two. ``columns`` / ``rows``: the table, as text.
    ``headlines``: the measured figures by their ``--json`` key (None: not computable here, and
    ``notes`` say why). ``notes``: where this setup differs from the paper's, and why."""

    key: str
    title: str
    compares: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    headlines: dict[str, object]
    notes: tuple[str, ...]


def cut(base: float | None, ours: float | None) -> float | None:
    """How much smaller ``ours`` is than ``base``: ``1 − ours/base`` (None without both)."""
    if base is None or ours is None or not math.isfinite(base) or not math.isfinite(ours) or base <= 0:
        return None
    return 1.0 - ours / base


def median_and_range(values: Sequence[float | None]) -> tuple[float | None, list[float] | None]:
    """The median and [min, max] of the values that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.median(present), [min(present), max(present)]


def ms(seconds: object) -> str:
    return "-" if not isinstance(seconds, (int, float)) or math.isnan(seconds) else f"{seconds * 1e3:.0f} ms"


def pct(x: float | None) -> str:
    """A signed change in percent; 0 without a sign."""
    if x is None or math.isnan(x):
        return "-"
    return "0 %" if round(x * 100) == 0 else f"{x * 100:+.0f} %"


def share(x: object) -> str:
    return "-" if not isinstance(x, (int, float)) or math.isnan(x) else f"{x:.2f}"
