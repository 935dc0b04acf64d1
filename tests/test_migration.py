"""The native migration machine against the executable specification in pydisco.testing.

Over arbitrary interleavings of offers, lifecycle events, failures and cancellations: the same
verdicts and states as the model, and a delivered sequence that is gap-free, duplicate-free
and equal to what the committing endpoints offered at those positions.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pydisco import (
    IllegalTransition,
    MigrationEvent,
    MigrationMachine,
    MigrationState,
    OfferResult,
    TokenRing,
)
from pydisco.testing import IllegalEvent, MigrationModel
from pydisco.testing._migration_model import TABLE

ENDPOINTS = [1, 2, 3]


def token_of(endpoint: int, position: int) -> tuple[int, str]:
    """Each endpoint's own (deterministic) token at each position, so a wrong commit shows."""
    return endpoint * 1000 + position, f"{endpoint}:{position};"


def same_outcome(real_call, model_call):  # type: ignore[no-untyped-def]
    """Run both; they must both succeed with equal results or both refuse."""
    try:
        expected = model_call()
    except (IllegalEvent, ValueError) as model_error:
        kind = IllegalTransition if isinstance(model_error, IllegalEvent) else ValueError
        with pytest.raises(kind) as info:
            real_call()
        # The native message may add a detail after the state and event.
        assert kind is ValueError or str(info.value).startswith(str(model_error))
        return None
    actual = real_call()
    return expected, actual


class MachineMatchesModel(RuleBasedStateMachine):
    @initialize()
    def make(self) -> None:
        self.ring = TokenRing(1024)
        self.machine = MigrationMachine(self.ring)
        self.model = MigrationModel()
        self.delivered: list[tuple[int, int, str, int]] = []
        self.now = 0

    def tick(self) -> int:
        self.now += 1
        return self.now

    @rule(ep=st.sampled_from(ENDPOINTS))
    def start(self, ep: int) -> None:
        same_outcome(lambda: self.machine.start(ep, now_ns=self.tick()), lambda: self.model.start(ep))

    @rule(eps=st.lists(st.sampled_from(ENDPOINTS), min_size=1, max_size=3))
    def race(self, eps: list[int]) -> None:
        same_outcome(lambda: self.machine.race(eps, now_ns=self.tick()), lambda: self.model.race(eps))

    @rule(ep=st.sampled_from(ENDPOINTS))
    def prepare(self, ep: int) -> None:
        same_outcome(lambda: self.machine.prepare(ep, now_ns=self.tick()), lambda: self.model.prepare(ep))

    @rule()
    def target_ready(self) -> None:
        r = same_outcome(lambda: self.machine.target_ready(now_ns=self.tick()), self.model.target_ready)
        if r is not None:
            assert r[0] == r[1]

    @rule(ep=st.sampled_from(ENDPOINTS))
    def fail(self, ep: int) -> None:
        same_outcome(
            lambda: self.machine.endpoint_failed(ep, now_ns=self.tick()),
            lambda: self.model.endpoint_failed(ep),
        )

    @rule(ep=st.sampled_from(ENDPOINTS))
    def resume(self, ep: int) -> None:
        r = same_outcome(lambda: self.machine.resume(ep, now_ns=self.tick()), lambda: self.model.resume(ep))
        if r is not None:
            assert r[0] == r[1]

    @rule()
    def cancel(self) -> None:
        same_outcome(lambda: self.machine.cancel(now_ns=self.tick()), self.model.cancel)

    @rule()
    def give_up(self) -> None:
        same_outcome(lambda: self.machine.give_up(now_ns=self.tick()), self.model.give_up)

    @rule(ep=st.sampled_from(ENDPOINTS), back=st.integers(-2, 2))
    def offer(self, ep: int, back: int) -> None:
        # Offers cluster around the next position: stale, exact, and ahead.
        position = max(0, self.model.committed + back)
        token_id, text = token_of(ep, position)
        verdict = self.machine.offer(ep, position, token_id, text, now_ns=self.tick())
        expected = self.model.offer(ep, position, token_id, text)
        assert verdict.name.lower() == expected.value

    @rule(ep=st.sampled_from(ENDPOINTS), back=st.integers(-1, 1))
    def offer_end(self, ep: int, back: int) -> None:
        position = max(0, self.model.committed + back)
        verdict = self.machine.offer_end(ep, position, now_ns=self.tick())
        assert verdict.name.lower() == self.model.offer_end(ep, position).value

    @invariant()
    def agree(self) -> None:
        assert self.machine.state.name.lower() == self.model.state.value
        assert self.machine.committed == self.model.committed
        assert self.machine.migrations == self.model.migrations
        for ep, c in self.model.counters.items():
            real = self.machine.counters(ep)
            assert (real.role.name.lower(), real.offered, real.accepted, real.dropped, real.duplicates) == (
                c.role.value,
                c.offered,
                c.accepted,
                c.dropped,
                c.duplicates,
            )

    @invariant()
    def delivered_is_gap_free_duplicate_free_and_what_was_offered(self) -> None:
        self.delivered.extend((t.position, t.token_id, t.text, t.source) for t in self.ring.pop_many(1024))
        assert [d[0] for d in self.delivered] == list(range(len(self.delivered)))
        assert self.delivered == self.model.delivered
        for position, token_id, text, source in self.delivered:
            assert (token_id, text) == token_of(source, position)
        assert self.machine.committed_text == "".join(d[2] for d in self.delivered)
        assert list(self.machine.committed_token_ids) == [d[1] for d in self.delivered]


TestMachineMatchesModel = MachineMatchesModel.TestCase
TestMachineMatchesModel.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


def test_native_table_is_the_specified_table() -> None:
    native = {
        (frm.name.lower(), ev.name.lower()): to.name.lower()
        for frm, ev, to in MigrationMachine.transition_table()
    }
    spec = {(frm.value, ev.value): to.value for (frm, ev), to in TABLE.items()}
    assert native == spec


def test_illegal_event_names_state_and_event() -> None:
    machine = MigrationMachine(TokenRing(8))
    machine.start(1)
    with pytest.raises(IllegalTransition, match="illegal migration event 'resume' in state 'streaming'"):
        machine.resume(2)
    assert machine.state == MigrationState.STREAMING  # unchanged


def test_transitions_are_timestamped_with_the_callers_clock() -> None:
    machine = MigrationMachine(TokenRing(8))
    machine.race([1, 2], now_ns=10)
    machine.offer(2, 0, 5, "a", now_ns=20)
    machine.prepare(1, now_ns=30)
    assert machine.target_ready(now_ns=40) == 1
    machine.offer(1, 1, 6, "b", now_ns=55)
    log = [(r.at_ns, r.event, r.to_state, r.position) for r in machine.transitions()]
    assert log == [
        (10, MigrationEvent.RACE, MigrationState.RACING, 0),
        (20, MigrationEvent.WON, MigrationState.STREAMING, 1),  # logged after its commit
        (30, MigrationEvent.PREPARE, MigrationState.PREPARING, 1),
        (40, MigrationEvent.TARGET_READY, MigrationState.HANDING_OVER, 1),
        (55, MigrationEvent.TAKEN_OVER, MigrationState.STREAMING, 2),
    ]
    assert machine.last_handover_gap_ns == 15
    assert machine.counters(1).started_at_position == 1


def test_a_full_ring_is_backpressure_and_loses_nothing() -> None:
    ring = TokenRing(2)
    machine = MigrationMachine(ring)
    machine.start(1)
    assert machine.offer(1, 0, 0, "a") == OfferResult.COMMITTED
    assert machine.offer(1, 1, 0, "b") == OfferResult.COMMITTED
    assert machine.offer(1, 2, 0, "c") == OfferResult.BACKPRESSURE
    assert [t.text for t in ring.pop_many()] == ["a", "b"]
    assert machine.offer(1, 2, 0, "c") == OfferResult.COMMITTED
    assert machine.committed_text == "abc"


def test_unknown_endpoint_failure_is_a_value_error() -> None:
    machine = MigrationMachine(TokenRing(8))
    machine.start(1)
    with pytest.raises(ValueError, match="never started"):
        machine.endpoint_failed(9)


def test_an_overlong_text_piece_is_refused_before_it_counts() -> None:
    from pydisco._core import TOKEN_TEXT_CAPACITY

    machine = MigrationMachine(TokenRing(8))
    machine.start(1)
    with pytest.raises(ValueError, match="exceeds the record capacity"):
        machine.offer(1, 0, 5, "x" * (TOKEN_TEXT_CAPACITY + 1))
    assert machine.counters(1).offered == 0 and machine.committed == 0
    assert machine.offer(1, 0, 5, "x" * TOKEN_TEXT_CAPACITY) == OfferResult.COMMITTED
