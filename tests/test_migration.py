"""The native migration machine against the executable specification in pydisco.testing.

Over arbitrary interleavings of offers, lifecycle events, failures and cancellations: the same
verdicts, states, transition log and finish reason as the model, and a ring holding a
gap-free, duplicate-free sequence equal to what the committing endpoints offered at those
positions, then exactly one end record once the answer has ended; the commit log agrees.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pydisco import (
    FinishReason,
    IllegalTransition,
    MigrationEvent,
    MigrationMachine,
    MigrationState,
    OfferResult,
    Token,
    TokenRing,
)
from pydisco.testing import IllegalEvent, MigrationModel
from pydisco.testing._migration_model import COMMITTER, TABLE, TERMINAL, Finish

ENDPOINTS = [1, 2, 3]
RING_CAPACITY = 16  # small, so answers often reach max_tokens within a run


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


MAX_TOKENS = st.none() | st.integers(1, RING_CAPACITY - 1)


class MachineMatchesModel(RuleBasedStateMachine):
    @initialize(max_tokens=MAX_TOKENS)
    def make(self, max_tokens: int | None) -> None:
        self.now = 0
        self.new_answer(max_tokens)

    # An answer ends early in most runs (cancel is legal everywhere): go on with a new one.
    @precondition(lambda self: self.model.state in TERMINAL)
    @rule(max_tokens=MAX_TOKENS)
    def next_answer(self, max_tokens: int | None) -> None:
        self.new_answer(max_tokens)

    def new_answer(self, max_tokens: int | None) -> None:
        self.ring = TokenRing(RING_CAPACITY)
        self.machine = MigrationMachine(self.ring, max_tokens)
        # By default the machine allows what the ring holds beside the end record.
        expected_max = RING_CAPACITY - 1 if max_tokens is None else max_tokens
        assert self.machine.max_tokens == expected_max
        self.model = MigrationModel(max_tokens=expected_max)
        self.delivered: list[tuple[int, int, str, int]] = []
        self.end: Token | None = None

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

    @precondition(lambda self: self.model.state in COMMITTER)
    @rule(data=st.data(), count=st.integers(1, 8))
    def offer_a_run_from_a_committer(self, data: st.DataObject, count: int) -> None:
        # Without this, arbitrary offers rarely commit more than a token or two before some
        # other event ends the answer, and max_tokens would almost never be reached.
        committers = [ep for ep, c in self.model.counters.items() if c.role is COMMITTER[self.model.state]]
        ep = data.draw(st.sampled_from(committers))
        for _ in range(count):
            self.offer(ep, 0)

    @rule(ep=st.sampled_from(ENDPOINTS), back=st.integers(-1, 1), reason=st.sampled_from(Finish))
    def offer_end(self, ep: int, back: int, reason: Finish) -> None:
        # FAILED and CANCELLED are not an endpoint's to give: both refuse them.
        position = max(0, self.model.committed + back)
        r = same_outcome(
            lambda: self.machine.offer_end(ep, position, FinishReason[reason.name], now_ns=self.tick()),
            lambda: self.model.offer_end(ep, position, reason),
        )
        if r is not None:
            assert r[1].name.lower() == r[0].value

    @invariant()
    def agree(self) -> None:
        assert self.machine.state.name.lower() == self.model.state.value
        assert self.machine.committed == self.model.committed
        assert self.machine.migrations == self.model.migrations
        expected_reason = "none" if self.model.ended is None else self.model.ended.value
        assert self.machine.finish_reason.name.lower() == expected_reason
        log = [(r.event.name.lower(), r.position) for r in self.machine.transitions()]
        assert log == [(event.value, position) for event, position in self.model.transitions]
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
    def ring_holds_the_tokens_then_one_end_record(self) -> None:
        for t in self.ring.pop_many(1024):
            assert self.end is None, f"{t!r} after the end record"
            if t.is_end:
                self.end = t
            else:
                assert t.finish_reason == FinishReason.NONE
                self.delivered.append((t.position, t.token_id, t.text, t.source))
        assert [d[0] for d in self.delivered] == list(range(len(self.delivered)))
        assert self.delivered == self.model.delivered
        for position, token_id, text, source in self.delivered:
            assert (token_id, text) == token_of(source, position)
        if self.model.ended is None:
            assert self.end is None
        else:
            assert self.end is not None
            assert (self.end.position, self.end.finish_reason.name.lower(), self.end.source, self.end.text) == (
                self.model.committed,
                self.model.ended.value,
                self.model.ended_by,
                "",
            )

    @invariant()
    def commit_log_is_the_delivered_sequence(self) -> None:
        text = self.machine.committed_text.encode()
        commits = [
            (c.position, c.token_id, text[c.text_begin :][: c.text_len].decode(), c.source)
            for c in self.machine.commits()
        ]
        assert commits == self.model.delivered
        assert sum(c.text_len for c in self.machine.commits()) == len(text)
        assert self.machine.committed_token_ids == [d[1] for d in self.model.delivered]


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
        (20, MigrationEvent.WON, MigrationState.STREAMING, 0),  # at the winning token's position
        (30, MigrationEvent.PREPARE, MigrationState.PREPARING, 1),
        (40, MigrationEvent.TARGET_READY, MigrationState.HANDING_OVER, 1),
        (55, MigrationEvent.TAKEN_OVER, MigrationState.STREAMING, 1),  # at the target's first
    ]
    assert machine.last_handover_gap_ns == 15
    assert machine.counters(1).started_at_position == 1


def test_a_full_ring_is_backpressure_and_loses_nothing() -> None:
    """A ring that did not start empty: the last free slot is kept for the end record."""
    ring = TokenRing(4)
    assert ring.try_push(0, 0, "old") and ring.try_push(1, 0, "old")
    machine = MigrationMachine(ring)
    machine.start(1)
    assert machine.offer(1, 0, 0, "a") == OfferResult.COMMITTED
    assert machine.offer(1, 1, 0, "b") == OfferResult.BACKPRESSURE
    assert [t.text for t in ring.pop_many()] == ["old", "old", "a"]
    assert machine.offer(1, 1, 0, "b") == OfferResult.COMMITTED
    machine.cancel()
    assert [(t.text, t.is_end) for t in ring.pop_many()] == [("b", False), ("", True)]
    assert machine.committed_text == "ab"


def test_the_answer_ends_at_max_tokens_with_one_end_record() -> None:
    ring = TokenRing(8)
    machine = MigrationMachine(ring, max_tokens=2)
    machine.start(1)
    assert machine.offer(1, 0, 5, "a", now_ns=1) == OfferResult.COMMITTED
    assert machine.finish_reason == FinishReason.NONE
    assert machine.offer(1, 1, 6, "b", now_ns=2) == OfferResult.COMMITTED
    assert (machine.state, machine.finish_reason) == (MigrationState.FINISHED, FinishReason.LENGTH)
    assert machine.offer(1, 2, 7, "c") == OfferResult.CLOSED
    tokens = list(ring.pop_many())
    assert [(t.position, t.is_end) for t in tokens] == [(0, False), (1, False), (2, True)]
    end = tokens[-1]
    assert (end.finish_reason, end.source, end.arrived_ns, end.text) == (FinishReason.LENGTH, 1, 2, "")
    assert "end" in repr(end)


def test_max_tokens_the_ring_cannot_hold_is_refused() -> None:
    ring = TokenRing(8)
    assert MigrationMachine(ring).max_tokens == 7
    assert MigrationMachine(ring, start_position=4).max_tokens == 11
    with pytest.raises(ValueError, match="capacity 8 holds 7 tokens"):
        MigrationMachine(ring, max_tokens=8)
    with pytest.raises(ValueError, match="must exceed start_position"):
        MigrationMachine(ring, max_tokens=3, start_position=3)


def test_offer_end_takes_stop_or_length_only() -> None:
    ring = TokenRing(8)
    machine = MigrationMachine(ring)
    machine.start(1)
    for reason in (FinishReason.NONE, FinishReason.FAILED, FinishReason.CANCELLED):
        with pytest.raises(ValueError, match="stop or length"):
            machine.offer_end(1, 0, reason)
    assert machine.state == MigrationState.STREAMING and len(ring) == 0
    assert machine.offer_end(1, 0) == OfferResult.COMMITTED  # STOP by default
    assert machine.finish_reason == FinishReason.STOP


def test_commit_offsets_are_utf8_bytes_of_the_committed_text() -> None:
    machine = MigrationMachine(TokenRing(8))
    machine.start(1)
    for position, piece in enumerate(["é", "t", "é"]):
        machine.offer(1, position, position, piece, produced_ns=10 * position, now_ns=10 * position + 1)
    commits = machine.commits()
    assert [(c.text_begin, c.text_len) for c in commits] == [(0, 2), (2, 1), (3, 2)]
    assert [(c.produced_ns, c.arrived_ns) for c in commits] == [(0, 1), (10, 11), (20, 21)]
    raw = machine.committed_text.encode()
    assert [raw[c.text_begin :][: c.text_len].decode() for c in commits] == ["é", "t", "é"]


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
