"""A remote reader's buffer as its sender models it, and when a client reports it."""

from __future__ import annotations

import pytest

from pydisco._types import ReaderState
from pydisco.batching import BufferReport, ReaderModel
from pydisco.cloud._reports import ReportRule, ReportSchedule


def test_the_model_drains_at_the_reading_rate_and_never_below_zero() -> None:
    model = ReaderModel(4.0)
    assert model.unread(10.0) == 0.0  # nothing delivered yet
    model.deliver(10, 0.0)
    assert model.unread(1.0) == pytest.approx(6.0)
    assert model.unread(5.0) == 0.0
    model.deliver(2, 5.0)  # after a stall: the reader starts again from nothing
    assert model.unread(5.25) == pytest.approx(1.0)


def test_a_report_resets_the_model_and_tokens_in_flight_still_count() -> None:
    model = ReaderModel(4.0)
    model.deliver(20, 0.0)
    # The reader says: 3 unread, reading at 2 tokens/s, having received up to position 15:
    # tokens 15..19 are still on their way, so 3 + 5 are coming.
    model.report(BufferReport(3, 2.0, 15), 1.0)
    assert model.rate == 2.0 and model.unread(1.0) == pytest.approx(8.0)
    assert model.unread(3.0) == pytest.approx(4.0)


def test_a_bad_report_is_refused() -> None:
    with pytest.raises(ValueError):
        BufferReport(-1, 4.0, 0)
    with pytest.raises(ValueError):
        BufferReport(1, 0.0, 0)


def test_a_steady_reader_is_not_reported_and_a_paused_one_is_at_once() -> None:
    schedule = ReportSchedule(4.0, 0, ReportRule(tolerance_tokens=2.0, tolerance_s=0.0, min_interval_s=0.2))
    reader = ReaderModel(4.0)  # the real reader, here taking tokens exactly at its rate
    for k in range(40):
        now = k * 0.05
        schedule.received(now)
        reader.deliver(1, now)
        state = ReaderState(round(reader.unread(now)), 4.0)
        assert schedule.due(state, k + 1, now) is None  # the server's model is right: nothing to say
    # The user stops reading: the buffer stays where it was while the model drains.
    held = round(reader.unread(2.0))
    reports = [schedule.due(ReaderState(held, 4.0), 40, 2.0 + t) for t in (0.1, 0.3, 0.6, 0.7, 0.75)]
    sent = [r for r in reports if r is not None]
    assert sent and sent[0] == BufferReport(held, 4.0, 40)
    assert len(sent) <= 2  # rate-limited, and once the model knows, quiet again


def test_a_new_reading_rate_is_reported_and_an_unpaced_reader_never() -> None:
    schedule = ReportSchedule(4.0, 0)
    assert schedule.due(ReaderState(0, None), 0, 1.0) is None
    assert schedule.due(ReaderState(0, 8.0), 0, 1.0) == BufferReport(0, 8.0, 0)
    assert schedule.due(ReaderState(0, 8.0), 0, 2.0) is None
