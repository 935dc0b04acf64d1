"""The native token ring against a deque model, at its full and empty edges and across threads."""

from __future__ import annotations

import collections
import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydisco import TokenRing
from pydisco._core import TOKEN_TEXT_CAPACITY, _produce_native
from pydisco.testing import token_texts


class RingMatchesDeque(RuleBasedStateMachine):
    @initialize(capacity=st.sampled_from([2, 4, 8, 16]))
    def make(self, capacity: int) -> None:
        self.ring = TokenRing(capacity)
        self.model: collections.deque[tuple[int, int, str]] = collections.deque()
        self.next_position = 0
        self.pushed = self.popped = self.rejected = self.high_water = 0

    @rule(token_id=st.integers(-1, 2**31 - 1), text=token_texts())
    def push(self, token_id: int, text: str) -> None:
        accepted = self.ring.try_push(self.next_position, token_id, text)
        full = len(self.model) == self.ring.capacity
        assert accepted == (not full)
        if accepted:
            self.model.append((self.next_position, token_id, text))
            self.next_position += 1
            self.pushed += 1
            self.high_water = max(self.high_water, len(self.model))
        else:
            self.rejected += 1

    @rule()
    def pop(self) -> None:
        token = self.ring.try_pop()
        if not self.model:
            assert token is None
            return
        assert token is not None
        assert (token.position, token.token_id, token.text) == self.model.popleft()
        self.popped += 1

    @rule(max_tokens=st.integers(0, 20))
    def pop_many(self, max_tokens: int) -> None:
        got = self.ring.pop_many(max_tokens)
        expected = [self.model.popleft() for _ in range(min(max_tokens, len(self.model)))]
        assert [(t.position, t.token_id, t.text) for t in got] == expected
        self.popped += len(got)

    @precondition(lambda self: not self.model)
    @rule()
    def pop_wait_on_empty_times_out(self) -> None:
        assert self.ring.pop_wait(timeout=0.0) is None

    @invariant()
    def statistics_match(self) -> None:
        s = self.ring.statistics()
        assert len(self.ring) == s.size == len(self.model)
        assert (s.pushed, s.popped, s.rejected, s.high_water) == (
            self.pushed,
            self.popped,
            self.rejected,
            self.high_water,
        )


TestRingMatchesDeque = RingMatchesDeque.TestCase
TestRingMatchesDeque.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_capacity_is_a_power_of_two() -> None:
    assert TokenRing(5).capacity == 8
    assert TokenRing(1).capacity == 2


def test_text_longer_than_a_record_is_refused_not_truncated() -> None:
    ring = TokenRing(4)
    with pytest.raises(ValueError, match="exceeds the record capacity"):
        ring.try_push(0, 1, "x" * (TOKEN_TEXT_CAPACITY + 1))
    assert len(ring) == 0
    assert ring.try_push(0, 1, "é" * (TOKEN_TEXT_CAPACITY // 2))
    token = ring.try_pop()
    assert token is not None and token.text == "é" * (TOKEN_TEXT_CAPACITY // 2)


def test_two_python_threads_deliver_everything_in_order() -> None:
    ring = TokenRing(32)
    count = 20_000

    def produce() -> None:
        for i in range(count):
            while not ring.try_push(i, i % 1000, str(i)):
                pass

    producer = threading.Thread(target=produce)
    producer.start()
    received: list[int] = []
    while len(received) < count:
        token = ring.pop_wait(timeout=10.0)
        assert token is not None, "producer stalled"
        received.append(token.position)
        assert token.text == str(token.position)
        received.extend(t.position for t in ring.pop_many(64))
    producer.join()
    assert received == list(range(count))


def test_native_producer_and_python_consumer() -> None:
    ring = TokenRing(256)
    count = 200_000
    producer = threading.Thread(target=_produce_native, args=(ring, count, "abc"))
    producer.start()  # releases the GIL while it pushes, so this thread keeps running
    seen = 0
    while seen < count:
        for token in ring.pop_many(512):
            assert token.position == seen
            seen += 1
    producer.join()
    assert ring.statistics().popped == count


def test_pop_wait_releases_the_gil() -> None:
    ring = TokenRing(4)
    # The pusher needs the GIL; if pop_wait held it, the wait would time out empty.
    timer = threading.Timer(0.05, lambda: ring.try_push(0, 7, "x"))
    timer.start()
    token = ring.pop_wait(timeout=30.0)
    timer.join()
    assert token is not None and token.token_id == 7


def test_wake_consumer_ends_a_blocking_wait_empty() -> None:
    ring = TokenRing(4)
    timer = threading.Timer(0.05, ring.wake_consumer)
    started = time.monotonic()
    timer.start()
    assert ring.pop_wait(timeout=30.0) is None
    assert time.monotonic() - started >= 0.04  # it did block until the wake-up
    timer.join()
