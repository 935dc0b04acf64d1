"""The per-answer timeline (``report.timeline``): every token's times and endpoint, every
machine transition, as JSON and as a Chrome/Perfetto trace that meets the trace-event format."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import trio
import trio.testing

import pydisco
from pydisco import RuntimeConfig, open_runtime
from pydisco._types import TokenPiece
from pydisco.policies import register_migration_policy
from pydisco.policies._base import MigrationView, Slo
from pydisco.runtime import Timeline, chrome_trace
from pydisco.testing import ScriptedEndpoint

# The trace-event format (the JSON object form): the fields each phase needs.
PHASES = {"X", "i", "I", "B", "E", "C", "M", "b", "e", "n", "s", "t", "f"}
REQUIRED = ("name", "ph", "pid", "tid", "ts")


def check_trace_event_format(trace: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Fails unless ``trace`` is a trace-event JSON object every viewer can load."""
    json.loads(json.dumps(trace))  # plain JSON, nothing a viewer cannot read
    assert set(trace) <= {"traceEvents", "displayTimeUnit", "otherData", "systemTraceEvents"}
    assert trace.get("displayTimeUnit", "ms") in ("ms", "ns")
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    for e in events:
        for field in REQUIRED:
            assert field in e, (field, e)
        assert isinstance(e["name"], str) and e["ph"] in PHASES, e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        assert isinstance(e["ts"], (int, float)) and math.isfinite(e["ts"]) and e["ts"] >= 0, e
        if "args" in e:
            assert isinstance(e["args"], dict), e
        if e["ph"] == "X":
            assert isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0, e
        if e["ph"] in ("i", "I"):
            assert e.get("s", "t") in ("g", "p", "t"), e
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index"), e
    # Complete events on one thread nest or follow each other; they never partly overlap.
    by_thread: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for e in events:
        if e["ph"] == "X":
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_thread.values():
        spans.sort(key=lambda s: (s[0], -s[1]))
        open_ends: list[float] = []
        for begin, end in spans:
            while open_ends and open_ends[-1] <= begin + 1e-3:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 1e-3, (begin, end, open_ends)
            open_ends.append(end)
    return events


def thread_names(events: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}


def script(name: str, n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=(1000 if name == "cloud" else 0) + i, text=f"{name[0]}{i} ") for i in range(n)]


class MigrateAt:
    name = "timeline-migrate-at"

    def __init__(self, position: int = 5) -> None:
        self.position = position

    def should_migrate(self, view: MigrationView) -> bool:
        return view.committed >= self.position


register_migration_policy("timeline-migrate-at", MigrateAt, replace=True)

N = 16


async def migrated_answers(count: int = 1) -> list[pydisco.AnswerReport]:
    """Answers that start on the device and migrate to the cloud after 5 tokens."""
    endpoints = {
        "device": ScriptedEndpoint("device", script("device", N), prefill_s=0.05, gaps_s=[0.03]),
        "cloud": ScriptedEndpoint("cloud", script("cloud", N), prefill_s=0.08, gaps_s=[0.01]),
    }
    config = RuntimeConfig(
        device_model=None, virtual_time=True, slo=Slo(ttft_target_s=1.0, reading_rate=20.0),
        dispatch="device-only", migration="timeline-migrate-at", device_standby=False,
    )  # fmt: skip
    reports = []
    async with open_runtime(config, endpoints=endpoints) as rt:
        for _ in range(count):
            async with rt.stream(prompt="hi", max_tokens=N) as answer:
                async for _piece in answer:
                    pass
            reports.append(answer.report)
    return reports


def run_virtual(count: int = 1) -> list[pydisco.AnswerReport]:
    return trio.run(migrated_answers, count, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_timeline_holds_every_token_and_transition_in_order() -> None:
    (report,) = run_virtual()
    timeline = report.timeline
    assert [m.kind for m in report.migrations] == ["migration"]
    handover = report.migrations[0].handover_position
    assert [t.position for t in timeline.tokens] == list(range(N))
    assert [t.endpoint for t in timeline.tokens] == ["device"] * handover + ["cloud"] * (N - handover)
    assert [t.text for t in timeline.tokens] == [p.text for p in script("device", N)[:handover] + script("cloud", N)[handover:]]
    for t in timeline.tokens:
        assert t.released_s is not None and t.deadline_s is not None
        assert 0 <= t.produced_s <= t.arrived_s == t.committed_s <= t.deadline_s <= t.released_s, t
    # The reader's pace: 20 tokens/s once the first token is out (virtual time: exact).
    released = [t.released_s for t in timeline.tokens]
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(released, released[1:]))
    # The pieces the reader got are the timeline's, and its transitions are the machine's.
    assert report.text == "".join(t.text for t in timeline.tokens)
    events = [t.event for t in timeline.transitions]
    assert events == ["start", "prepare", "target_ready", "taken_over", "finish"]
    assert timeline.transitions[1].endpoint == "cloud" and timeline.transitions[3].position == handover
    at = [t.at_s for t in timeline.transitions]
    assert at == sorted(at)
    assert timeline.answer_id


def test_the_timeline_as_json_round_trips() -> None:
    (report,) = run_virtual()
    data = json.loads(report.timeline.to_json())
    assert data == report.timeline.as_dict()
    assert len(data["tokens"]) == N and data["tokens"][0]["endpoint"] == "device"
    assert data["transitions"][-1]["to_state"] == "finished"


def test_the_trace_meets_the_trace_event_format_and_shows_both_endpoints_after_a_migration() -> None:
    (report,) = run_virtual()
    events = check_trace_event_format(report.timeline.to_chrome_trace())
    names = thread_names(events)
    assert {"device", "cloud", "machine", "reader"} <= set(names.values())
    # Every token appears on the thread of the endpoint that produced it, and on the reader's.
    produced = {(names[(e["pid"], e["tid"])], e["args"]["position"], e["name"])
                for e in events if e["ph"] == "i" and e.get("cat") == "token"}  # fmt: skip
    expected = {(t.endpoint, t.position, t.text) for t in report.timeline.tokens}
    assert produced == expected and len(expected) == N
    reader = [e for e in events if e["ph"] == "X" and names[(e["pid"], e["tid"])] == "reader"]
    assert [e["name"] for e in reader] == [t.text for t in report.timeline.tokens]
    assert [e["args"]["endpoint"] for e in reader].count("cloud") == N - report.migrations[0].handover_position
    # The handover's states are on the machine's thread, and the unread counter never goes negative.
    states = [e["name"] for e in events if e["ph"] == "X" and names[(e["pid"], e["tid"])] == "machine"]
    assert states == ["streaming", "preparing", "handing_over", "streaming"]
    unread = [e["args"]["committed, not released"] for e in events if e["ph"] == "C"]
    assert min(unread) >= 0 and unread[-1] == 0


def test_a_trace_of_several_answers_puts_them_on_one_time_axis() -> None:
    reports = run_virtual(count=2)
    trace = chrome_trace([r.timeline for r in reports])
    events = check_trace_event_format(trace)
    assert {e["pid"] for e in events} == {1, 2}
    first_end = max(e["ts"] for e in events if e["pid"] == 1)
    second_start = min(e["ts"] for e in events if e["pid"] == 2 and e["ph"] != "M")
    assert second_start >= first_end - 1e-3  # the second answer started after the first ended
    assert len({r.timeline.answer_id for r in reports}) == 2


def test_a_timeline_of_an_answer_with_no_tokens_is_still_a_trace() -> None:
    timeline = Timeline(answer_id="empty", started_ns=5, tokens=(), transitions=())
    trace = timeline.to_chrome_trace()
    assert [e["ph"] for e in trace["traceEvents"]] == ["M"] * 5
    with pytest.raises(AssertionError):
        check_trace_event_format({"traceEvents": [{"ph": "X", "name": "x", "pid": 1, "tid": 1, "ts": 0}]})  # no dur
