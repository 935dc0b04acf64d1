"""The pacer: its schedule under an injected clock (rate changes, missed deadlines, every
policy), the manual and virtual-time drivers, the real-time thread feeding a Trio task, the
answer's end record (never paced), release_all and the release log."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from pydisco import (
    FinishReason,
    MigrationMachine,
    MissPolicy,
    OfferResult,
    Pacer,
    PaceSchedule,
    ReleasedTokens,
    TokenRing,
    VirtualTimePacer,
)
from pydisco.testing import PacingStep, pacing_scripts


class ReferenceSchedule:
    """docs/architecture.md's pacing rules, written out plainly."""

    def __init__(self, interval: int, policy: MissPolicy) -> None:
        self.interval, self.policy = interval, policy
        self.started = False
        self.next_nominal = 0
        self.last: tuple[int, int, int] = (0, 0, 0)  # nominal, effective, released

    def deadline(self, available: int) -> tuple[int, int]:
        if not self.started:
            return available, available
        return self.next_nominal, max(self.next_nominal, available)

    def _advance(self) -> None:
        nominal, effective, released = self.last
        if self.policy == MissPolicy.DELAY:
            self.next_nominal = effective + self.interval
        elif self.policy == MissPolicy.CATCH_UP:
            self.next_nominal = nominal + self.interval
        else:  # SKIP: the first grid point after the release
            self.next_nominal = nominal + self.interval
            while self.interval > 0 and self.next_nominal <= released:
                self.next_nominal += self.interval

    def released(self, nominal: int, effective: int, at: int) -> None:
        self.started = True
        self.last = (nominal, effective, at)
        self._advance()

    def set_interval(self, interval: int) -> None:
        self.interval = interval
        if self.started:
            self._advance()


policies = st.sampled_from([MissPolicy.DELAY, MissPolicy.CATCH_UP, MissPolicy.SKIP])


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    interval=st.integers(0, 50_000_000),
    steps=st.lists(
        st.tuples(
            st.integers(0, 80_000_000),  # availability after the previous release
            st.integers(0, 30_000_000),  # how late the driver releases it
            st.none() | st.integers(0, 50_000_000),  # a rate change before this token
        ),
        max_size=50,
    ),
)
def test_schedule_matches_the_reference(policy: MissPolicy, interval: int, steps: list[tuple[int, int, int | None]]) -> None:
    real, ref = PaceSchedule(interval, policy), ReferenceSchedule(interval, policy)
    now = 0
    for available_gap, late, new_interval in steps:
        if new_interval is not None:
            real.set_interval(new_interval)
            ref.set_interval(new_interval)
        available = now + available_gap
        nominal, effective = real.next(available)
        assert (nominal, effective) == ref.deadline(available)
        assert effective >= available
        now = effective + late
        real.on_released(nominal, effective, now)
        ref.released(nominal, effective, now)


@settings(max_examples=200, deadline=None)
@given(policy=policies, script=pacing_scripts())
def test_manual_driver_never_early_never_holds_a_due_token(policy: MissPolicy, script: list[PacingStep]) -> None:
    """Commits, rate changes and (possibly late) driver wake-ups in arbitrary order: tokens
    come out in order, never before their deadline, every due token goes out at each wake-up,
    and the lateness log is exactly release time minus deadline."""
    inp, out = TokenRing(512), TokenRing(512)
    pacer = Pacer(inp, out, interval_ns=5_000_000, policy=policy)
    ref = ReferenceSchedule(5_000_000, policy)
    arrivals: list[int] = []
    expected_lateness: list[int] = []
    released = 0
    for step in script:
        if step.interval_ns is not None:
            pacer.set_interval_ns(step.interval_ns)
            ref.set_interval(step.interval_ns)
        for _ in range(step.commits):
            assert inp.try_push(len(arrivals), 0, "t", arrived_ns=step.at_ns)
            arrivals.append(step.at_ns)
        if step.drive:
            n = pacer.release_due(step.at_ns)
            for _ in range(n):
                nominal, effective = ref.deadline(arrivals[released])
                assert effective <= step.at_ns, "released early"
                ref.released(nominal, effective, step.at_ns)
                expected_lateness.append(step.at_ns - effective)
                released += 1
            if released < len(arrivals):  # the next one is really not due yet
                assert ref.deadline(arrivals[released])[1] > step.at_ns
                assert pacer.next_deadline() == ref.deadline(arrivals[released])[1]
    tokens = out.pop_many(1024)
    assert [t.position for t in tokens] == list(range(released))
    assert pacer.take_lateness() == expected_lateness
    assert pacer.statistics().released == released


def test_virtual_time_pacer_releases_exactly_on_schedule() -> None:
    """Under MockClock the same schedule runs in virtual time: every token at its deadline."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    inp, out = TokenRing(64), TokenRing(64)
    pacer = Pacer(inp, out, interval_ns=50_000_000)  # 20 tokens/s

    async def main() -> list[tuple[int, int]]:
        driver = VirtualTimePacer(pacer)
        receiver = ReleasedTokens(pacer)
        got: list[tuple[int, int]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            t0 = driver.now_ns()
            for i in range(10):  # all ten committed at once, then paced
                inp.try_push(i, i, "x", arrived_ns=t0)
            driver.notify()
            await trio.sleep(0.21)  # after the release at 200 ms (never at the same instant)
            pacer.set_interval_ns(100_000_000)  # slow down mid-answer
            driver.notify()
            while len(got) < 10:
                got.extend((t.position, t.released_ns - t0) for t in await receiver.receive())
            nursery.cancel_scope.cancel()
        return got

    got = trio.run(main, clock=clock)
    ms = [round(at / 1e6) for _, at in got]
    # 0, 50, 100, 150, 200 at 20 tok/s; the change at 210 ms applies from the next token on.
    assert [p for p, _ in got] == list(range(10))
    assert ms == [0, 50, 100, 150, 200, 300, 400, 500, 600, 700]
    assert pacer.take_lateness() == [0] * 10


def test_thread_pacer_feeds_a_trio_task_in_order_and_never_early() -> None:
    inp, out = TokenRing(256), TokenRing(256)
    interval = 2_000_000
    pacer = Pacer(inp, out, interval_ns=interval)

    async def main() -> list[tuple[int, int, float]]:
        receiver = ReleasedTokens(pacer)
        got: list[tuple[int, int, float]] = []
        with trio.fail_after(30):
            t0 = time.monotonic_ns()
            for i in range(40):
                assert inp.try_push(i, i, "x", arrived_ns=t0)
            while len(got) < 40:
                for token in await receiver.receive():
                    got.append((token.position, token.released_ns - t0, time.monotonic_ns() - t0))
        return got

    pacer.start(realtime=False)
    try:
        got = trio.run(main)
    finally:
        pacer.stop()
    assert [p for p, _, _ in got] == list(range(40))
    for i, (_, released, received) in enumerate(got):
        assert released >= i * interval  # never early
        assert received >= released
    lateness = pacer.take_lateness()
    assert len(lateness) == 40 and min(lateness) >= 0
    assert pacer.statistics().released == 40


def committed_answer(tokens: int, at_ns: int, end: str = "stop") -> TokenRing:
    """The committed ring of an answer of `tokens` tokens committed at `at_ns`, then ended:
    "stop" as its endpoint would, or "cancel"."""
    ring = TokenRing(64)
    machine = MigrationMachine(ring)
    machine.start(1, now_ns=at_ns)
    for i in range(tokens):
        assert machine.offer(1, i, i, f"t{i}", now_ns=at_ns) == OfferResult.COMMITTED
    if end == "stop":
        assert machine.offer_end(1, tokens, now_ns=at_ns) == OfferResult.COMMITTED
    else:
        machine.cancel(now_ns=at_ns)
    return ring


def test_the_end_record_follows_the_last_token_unpaced() -> None:
    inp = committed_answer(3, at_ns=0)
    out = TokenRing(64)
    pacer = Pacer(inp, out, interval_ns=50_000_000)
    assert pacer.release_due(0) == 1
    assert pacer.release_due(60_000_000) == 1  # token 1; token 2 (due at 100 ms) holds the end back
    assert pacer.next_deadline() == 100_000_000
    assert pacer.release_due(100_000_000) == 2  # token 2 and, at once, the end
    assert pacer.next_deadline() is None
    got = list(out.pop_many())
    assert [(t.position, t.is_end, t.released_ns) for t in got] == [
        (0, False, 0),
        (1, False, 60_000_000),
        (2, False, 100_000_000),
        (3, True, 100_000_000),
    ]
    assert got[-1].finish_reason == FinishReason.STOP and got[-1].source == 1
    releases = pacer.take_releases()
    assert [(r.position, r.deadline_ns, r.released_ns, r.is_end) for r in releases] == [
        (0, 0, 0, False),
        (1, 50_000_000, 60_000_000, False),
        (2, 100_000_000, 100_000_000, False),
        (3, 0, 100_000_000, True),  # its deadline is its commit time: not paced
    ]
    stats = pacer.statistics()
    assert stats.released == 3 and stats.max_lateness_ns == 10_000_000


def test_the_thread_delivers_the_end_without_pacing_it() -> None:
    """At 10 s per token, an end record paced like a token would miss the time limit."""
    inp = committed_answer(1, at_ns=time.monotonic_ns())
    pacer = Pacer(inp, TokenRing(64), interval_ns=10_000_000_000)

    async def main() -> list[tuple[int, bool]]:
        receiver = ReleasedTokens(pacer)
        got: list[tuple[int, bool]] = []
        with trio.fail_after(5):
            while not got or not got[-1][1]:
                got.extend((t.position, t.is_end) for t in await receiver.receive())
        return got

    pacer.start(realtime=False)
    try:
        assert trio.run(main) == [(0, False), (1, True)]
    finally:
        pacer.stop()
    lateness = pacer.take_lateness()  # the token's only: the end record is not counted
    assert len(lateness) == 1 and lateness[0] >= 0


def test_release_all_hands_a_cancelled_answer_over_at_once() -> None:
    inp = committed_answer(4, at_ns=0, end="cancel")
    out = TokenRing(4)
    pacer = Pacer(inp, out, interval_ns=1_000_000_000)
    assert pacer.release_due(0) == 1  # the rest would take seconds
    assert pacer.release_all(5) == 3  # the output ring is full: it stops there
    got = list(out.pop_many())
    assert pacer.release_all(6) == 1
    got += list(out.pop_many())
    assert [(t.position, t.is_end, t.released_ns) for t in got] == [
        (0, False, 0),
        (1, False, 5),
        (2, False, 5),
        (3, False, 5),
        (4, True, 6),
    ]
    assert got[-1].finish_reason == FinishReason.CANCELLED and got[-1].source == 0
    # Tokens released ahead of their deadlines show it as negative lateness.
    assert pacer.take_lateness() == [0, 5 - 1_000_000_000, 5 - 2_000_000_000, 5 - 3_000_000_000]
    pacer.start(realtime=False)
    try:
        with pytest.raises(RuntimeError, match="thread is running"):
            pacer.release_all(0)
    finally:
        pacer.stop()


def test_a_full_release_log_drops_entries_and_counts_them() -> None:
    inp, out = TokenRing(16), TokenRing(16)
    pacer = Pacer(inp, out, log_capacity=4)
    for i in range(6):
        assert inp.try_push(i, i, "x", arrived_ns=10)
    assert pacer.release_due(10) == 6
    assert pacer.statistics().lateness_samples_dropped == 2
    assert [r.position for r in pacer.take_releases()] == [0, 1, 2, 3]
    assert inp.try_push(6, 6, "x", arrived_ns=20)
    assert pacer.release_due(20) == 1
    assert [(r.position, r.released_ns) for r in pacer.take_releases()] == [(6, 20)]
    assert pacer.statistics().released == 7


def test_thread_pacer_lateness_has_a_loose_upper_bound() -> None:
    """At normal priority on a busy machine releases are late by up to a few milliseconds;
    a p99 of 20 ms is missed only by a broken pacer (sleeping past deadlines, or a lock)."""
    count, interval = 200, 2_000_000
    inp, out = TokenRing(256), TokenRing(256)
    pacer = Pacer(inp, out, interval_ns=interval)
    pacer.start(realtime=False)
    try:
        t0 = time.monotonic_ns()
        for i in range(count):
            assert inp.try_push(i, i, "x", arrived_ns=t0)
        for i in range(count):
            token = out.pop_wait(timeout=30.0)
            assert token is not None and token.position == i
    finally:
        pacer.stop()
    lateness = sorted(pacer.take_lateness())
    assert len(lateness) == count
    p99 = lateness[int(0.99 * (count - 1))]
    assert p99 < 20_000_000, f"p99 release lateness {p99 / 1e6:.1f} ms"

    pacer = Pacer(TokenRing(8), TokenRing(8))
    pacer.start(realtime=False)
    try:
        with pytest.raises(RuntimeError, match="thread is running"):
            pacer.release_due(0)
        with pytest.raises(ValueError):
            VirtualTimePacer(pacer)
    finally:
        pacer.stop()
    assert not pacer.running


def fifo_permitted() -> bool:
    """Whether this process may give a thread SCHED_FIFO, asked on a throwaway thread."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0]


def test_realtime_request_reports_what_it_got() -> None:
    """The pacer gets SCHED_FIFO exactly when the OS permits it, and says so; without the
    request it stays at normal priority."""
    expected = fifo_permitted()
    for asked in (True, False):
        pacer = Pacer(TokenRing(8), TokenRing(8))
        pacer.start(realtime=asked)
        try:
            stats = pacer.statistics()
            assert stats.running
            assert stats.realtime == (asked and expected)
        finally:
            pacer.stop()


def test_invalid_rates_are_refused() -> None:
    pacer = Pacer(TokenRing(8), TokenRing(8))
    with pytest.raises(ValueError):
        pacer.set_rate(-1.0)
    with pytest.raises(ValueError):
        pacer.set_interval_ns(-5)
    pacer.set_rate(4.0)
    assert pacer.interval_ns == 250_000_000
