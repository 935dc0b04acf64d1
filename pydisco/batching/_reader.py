"""A remote reader's unread buffer as the side that sends it tokens can know it.

The reader takes tokens at its reading rate whenever it has any (Andes' client pacer). Its
buffer is then a fluid queue: each delivered token adds one, it drains at ``rate`` tokens/s and
never below zero. Between the reader's own reports that queue is all the sender knows; a report
(``buffered`` tokens unread, having received every token before position ``received``) resets
it, the tokens delivered but not yet received then counting as on their way into the buffer.

The server's step loop keeps one :class:`ReaderModel` per remote answer (fed with its
deliveries and the client's reports); the client keeps the same model of what the server
believes, and reports only when its real buffer has drifted from it (``pydisco.cloud``).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True, slots=True)
class BufferReport:
    """What a reader said of itself: ``buffered`` tokens unread, reading at ``rate`` tokens/s,
    having received every token before answer position ``received``."""

    buffered: int
    rate: float
    received: int

    def __post_init__(self) -> None:
        if self.buffered < 0 or self.received < 0:
            raise ValueError(f"a reader report needs buffered >= 0 and received >= 0, got {self!r}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"a reader report needs a finite rate > 0, got {self.rate!r}")


class ReaderModel:
    """The fluid-queue model of one reader's buffer. Not thread-safe: one owner (the step loop's
    thread on a server; the answer's task on a client). Times are the owner's clock, seconds."""

    def __init__(self, rate: float, *, start_position: int = 0) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"a reading rate must be finite and > 0, got {rate!r}")
        self.rate = rate
        self.delivered = start_position  # the answer position after the last token delivered
        self._level = 0.0
        self._at: float | None = None  # when _level was true; None before any delivery or report
        self.reports = 0

    def unread(self, now_s: float) -> float:
        """Tokens delivered and not yet read at ``now_s`` (0 before the first token)."""
        if self._at is None:
            return 0.0
        return max(0.0, self._level - self.rate * max(0.0, now_s - self._at))

    def deliver(self, tokens: int, now_s: float) -> None:
        """``tokens`` more tokens were sent to the reader at ``now_s``."""
        self._level = self.unread(now_s) + tokens
        self._at = now_s if self._at is None else max(self._at, now_s)
        self.delivered += tokens

    def report(self, report: BufferReport, now_s: float) -> None:
        """The reader's own word, taken as true at ``now_s``; tokens delivered at or after
        ``report.received`` had not reached it yet, so they still count as coming."""
        self.rate = report.rate
        self._level = report.buffered + max(0, self.delivered - report.received)
        self._at = now_s
        self.reports += 1


class ReportBox:
    """The newest report of one reader, handed from the task that receives it (a server
    connection's) to the step loop's thread. One writer, one reader: the newest report replaces
    the reference in one assignment and carries a sequence number, so the loop applies each
    once and never sees half of one."""

    def __init__(self) -> None:
        self._latest: tuple[int, BufferReport] | None = None

    def put(self, report: BufferReport) -> None:
        sequence = self._latest[0] + 1 if self._latest is not None else 1
        self._latest = (sequence, report)

    def latest(self) -> tuple[int, BufferReport] | None:
        """(sequence number, report) of the newest report, or None before the first."""
        return self._latest
