"""One answer's timeline: when each token was produced, arrived, was committed and released,
and every transition of its migration machine — as plain records (``AnswerReport.timeline``,
derived from the native logs in ``_report``), as JSON, and as a Chrome/Perfetto trace.

The trace (the trace-event format's JSON object form, which ui.perfetto.dev and
chrome://tracing open) has one process per answer and these threads:

* one per endpoint: an instant per token at the moment the endpoint produced it, inside a
  slice for each stretch of consecutive positions that endpoint committed;
* ``machine``: a slice per state (streaming, preparing, handing over, ...) and an instant per
  event, so a handover shows as ``preparing`` → ``handing_over`` → ``streaming``;
* ``reader``: a slice per token from the previous release to this one — the pace the reader
  saw (the first from the request's start: the TTFT);
* a counter, ``unread``: tokens committed but not yet released.
Times are microseconds since the first answer's start.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Timeline", "TokenTimes", "TransitionTimes", "chrome_trace"]


@dataclasses.dataclass(frozen=True, slots=True)
class TokenTimes:
    """One committed token's life, in seconds since the request started.

    ``produced_s``: when the endpoint produced it (its arrival less the age the endpoint
    reported: the server's queueing plus half the round trip, for the cloud).
    ``arrived_s``: when the runtime got it. ``committed_s``: when the migration machine
    committed it — the same instant, since a token is committed when it is offered or never;
    a name of its own so a reader of the timeline need not know that.
    ``deadline_s`` / ``released_s``: its pacing deadline and when the pacer released it to
    the reader (None while it waits in the pacer).
    """

    position: int
    text: str
    token_id: int
    endpoint: str
    produced_s: float
    arrived_s: float
    deadline_s: float | None
    released_s: float | None

    @property
    def committed_s(self) -> float:
        return self.arrived_s  # an offer commits on arrival or is dropped

    def as_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        at = list(fields).index("arrived_s") + 1
        items = list(fields.items())
        return dict(items[:at] + [("committed_s", self.committed_s)] + items[at:])


@dataclasses.dataclass(frozen=True, slots=True)
class TransitionTimes:
    """One transition of the answer's migration machine. ``position``: the committed count
    when it happened (for ``won`` and ``taken_over`` the position of the token that caused
    them); ``endpoint``: the endpoint the event names, if any."""

    at_s: float
    event: str
    from_state: str
    to_state: str
    endpoint: str | None
    position: int


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Everything that happened to one answer, in order. ``started_ns`` is the request's start
    on the answer's clock (CLOCK_MONOTONIC, or Trio's clock in virtual time), the origin of
    every ``_s`` time here; it places several answers on one trace."""

    answer_id: str
    started_ns: int
    tokens: tuple[TokenTimes, ...]
    transitions: tuple[TransitionTimes, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready: lists, not tuples)."""
        return {
            "answer_id": self.answer_id,
            "started_ns": self.started_ns,
            "tokens": [t.as_dict() for t in self.tokens],
            "transitions": [dataclasses.asdict(t) for t in self.transitions],
        }

    def to_json(self, **dumps_options: Any) -> str:
        return json.dumps(self.as_dict(), **dumps_options)

    def trace_events(self, *, pid: int = 1, origin_ns: int | None = None) -> list[dict[str, Any]]:
        """This answer's trace events (process ``pid``); times from ``origin_ns`` (default: the
        answer's own start)."""
        offset_us = (self.started_ns - (self.started_ns if origin_ns is None else origin_ns)) / 1e3
        return _TraceBuilder(self, pid, offset_us).events()

    def to_chrome_trace(self) -> dict[str, Any]:
        """The trace-event JSON object for this answer alone (``json.dump`` it to a file)."""
        return chrome_trace([self])


def chrome_trace(timelines: Iterable[Timeline]) -> dict[str, Any]:
    """One trace of several answers (a process each), on a common time axis."""
    timelines = list(timelines)
    origin = min((t.started_ns for t in timelines), default=0)
    events: list[dict[str, Any]] = []
    for pid, timeline in enumerate(timelines, start=1):
        events.extend(timeline.trace_events(pid=pid, origin_ns=origin))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


_MACHINE_TID = 100
_READER_TID = 101


class _TraceBuilder:
    def __init__(self, timeline: Timeline, pid: int, offset_us: float) -> None:
        self._t = timeline
        self._pid = pid
        self._offset_us = offset_us
        self._out: list[dict[str, Any]] = []
        endpoints = sorted({tok.endpoint for tok in timeline.tokens} | {tr.endpoint for tr in timeline.transitions if tr.endpoint})
        self._tids = {name: i for i, name in enumerate(endpoints, start=1)}

    def _us(self, seconds: float) -> float:
        return round(self._offset_us + seconds * 1e6, 3)

    def _event(self, ph: str, name: str, tid: int, ts_s: float, **fields: Any) -> None:
        self._out.append({"name": name, "ph": ph, "pid": self._pid, "tid": tid, "ts": self._us(ts_s), **fields})

    def _slice(self, name: str, tid: int, begin_s: float, end_s: float, cat: str, args: dict[str, Any]) -> None:
        dur = max(0.0, round((end_s - begin_s) * 1e6, 3))
        self._event("X", name, tid, begin_s, dur=dur, cat=cat, args=args)

    def events(self) -> list[dict[str, Any]]:
        self._names()
        self._endpoints()
        self._machine()
        self._reader()
        self._unread()
        return self._out

    def _names(self) -> None:
        t = self._t
        self._event("M", "process_name", 0, 0.0, args={"name": f"answer {t.answer_id}"})
        threads = [*self._tids.items(), ("machine", _MACHINE_TID), ("reader", _READER_TID)]
        for order, (name, tid) in enumerate(threads):
            self._event("M", "thread_name", tid, 0.0, args={"name": name})
            self._event("M", "thread_sort_index", tid, 0.0, args={"sort_index": order})

    def _endpoints(self) -> None:
        stretch: list[TokenTimes] = []
        for token in self._t.tokens:
            if stretch and token.endpoint != stretch[-1].endpoint:
                self._stretch(stretch)
                stretch = []
            stretch.append(token)
            self._event("i", token.text, self._tids[token.endpoint], token.produced_s, s="t", cat="token", args={
                "position": token.position, "token_id": token.token_id,
                "arrived_ms": round(token.arrived_s * 1e3, 3), "committed_ms": round(token.committed_s * 1e3, 3),
            })  # fmt: skip
        if stretch:
            self._stretch(stretch)

    def _stretch(self, tokens: Sequence[TokenTimes]) -> None:
        first, last = tokens[0], tokens[-1]
        name = f"{first.endpoint} {first.position}-{last.position}"
        self._slice(name, self._tids[first.endpoint], first.produced_s, last.produced_s, "endpoint",
                    {"tokens": len(tokens)})  # fmt: skip

    def _machine(self) -> None:
        transitions = self._t.transitions
        for i, tr in enumerate(transitions):
            args = {"from": tr.from_state, "to": tr.to_state, "endpoint": tr.endpoint, "position": tr.position}
            self._event("i", tr.event, _MACHINE_TID, tr.at_s, s="t", cat="transition", args=args)
            if i + 1 < len(transitions):
                self._slice(tr.to_state, _MACHINE_TID, tr.at_s, transitions[i + 1].at_s, "state", {"entered_by": tr.event})

    def _reader(self) -> None:
        previous = 0.0
        for token in self._t.tokens:
            if token.released_s is None:
                break
            lateness_ms = None if token.deadline_s is None else round((token.released_s - token.deadline_s) * 1e3, 3)
            self._slice(token.text, _READER_TID, previous, token.released_s, "release",
                        {"position": token.position, "endpoint": token.endpoint, "lateness_ms": lateness_ms})  # fmt: skip
            previous = token.released_s

    def _unread(self) -> None:
        changes = sorted(
            [(tok.committed_s, 1) for tok in self._t.tokens]
            + [(tok.released_s, -1) for tok in self._t.tokens if tok.released_s is not None],
            key=lambda change: (change[0], -change[1]),  # a commit before its release at one instant
        )
        unread = 0
        for at_s, change in changes:
            unread += change
            self._event("C", "unread", _READER_TID, at_s, args={"committed, not released": unread})
