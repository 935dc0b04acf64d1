"""When a client reports its reader to the server (``reader_report``, protocol version 2).

Not per token: the server already models the reader's buffer from the tokens it sent and the
last report (``pydisco.batching.ReaderModel``). The client keeps the same model, fed with what
it received and what it reported, and reports when its real buffer has drifted from that model
by more than a tolerance, or its reading rate has changed — never more often than
``min_interval_s``. A steady reader is reported about once; one that pauses, speeds up or falls
behind is reported as soon as that matters to the server's scheduler.
"""

from __future__ import annotations

import dataclasses
import math

from .._types import ReaderState
from ..batching import BufferReport, ReaderModel


@dataclasses.dataclass(frozen=True)
class ReportRule:
    """``tolerance_tokens`` / ``tolerance_s``: a drift of at least the larger of that many tokens
    and that many seconds of reading is worth a report; ``rate_change``: so is a reading rate
    that changed by that share; ``min_interval_s`` between two reports of one answer."""

    tolerance_tokens: float = 2.0
    tolerance_s: float = 0.25
    rate_change: float = 0.1
    min_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if not (self.tolerance_tokens > 0 and self.tolerance_s >= 0 and self.rate_change > 0 and self.min_interval_s >= 0):
            raise ValueError(f"a report rule needs positive tolerances and min_interval_s >= 0, got {self!r}")


class ReportSchedule:
    """One answer's reports. Times are the client's (seconds, one clock)."""

    def __init__(self, rate: float, start_position: int, rule: ReportRule = ReportRule()) -> None:
        self.rule = rule
        self._believed = ReaderModel(rate, start_position=start_position)  # the server's view of the reader
        self._last_sent = -math.inf
        self.sent = 0

    def received(self, now_s: float) -> None:
        """A token of this answer arrived."""
        self._believed.deliver(1, now_s)

    def due(self, state: ReaderState, received: int, now_s: float) -> BufferReport | None:
        """The report to send now, if one is due (and then it counts as sent)."""
        rate = state.reading_rate_tps
        if rate is None or not (math.isfinite(rate) and rate > 0) or now_s - self._last_sent < self.rule.min_interval_s:
            return None
        believed = self._believed
        drift = abs(state.buffered_tokens - believed.unread(now_s))
        tolerance = max(self.rule.tolerance_tokens, rate * self.rule.tolerance_s)
        if drift < tolerance and abs(rate - believed.rate) < self.rule.rate_change * believed.rate:
            return None
        report = BufferReport(max(0, state.buffered_tokens), rate, received)
        believed.report(report, now_s)
        self._last_sent = now_s
        self.sent += 1
        return report
