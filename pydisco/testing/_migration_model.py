"""A plain-Python model of the native migration state machine, written from its specification
(docs/architecture.md) rather than from its code: the oracle that property tests compare the
C++ machine with, and a reference for anyone writing a coordinator against it."""

from __future__ import annotations

import dataclasses
import enum


class State(enum.Enum):
    IDLE = "idle"
    RACING = "racing"
    STREAMING = "streaming"
    PREPARING = "preparing"
    HANDING_OVER = "handing_over"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Event(enum.Enum):
    START = "start"
    RACE = "race"
    WON = "won"
    RACER_FAILED = "racer_failed"
    LAST_RACER_FAILED = "last_racer_failed"
    PREPARE = "prepare"
    TARGET_READY = "target_ready"
    TAKEN_OVER = "taken_over"
    TARGET_FAILED = "target_failed"
    SOURCE_FAILED = "source_failed"
    RESUME = "resume"
    FINISH = "finish"
    CANCEL = "cancel"
    GIVE_UP = "give_up"


class Role(enum.Enum):
    NONE = "none"
    RACER = "racer"
    SOURCE = "source"
    TARGET = "target"
    STANDBY = "standby"
    STOPPED = "stopped"
    FAILED = "failed"


class Finish(enum.Enum):
    """Why the answer ended (the native FinishReason, NONE being ``ended is None``)."""

    STOP = "stop"
    LENGTH = "length"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Offer(enum.Enum):
    COMMITTED = "committed"
    DUPLICATE = "duplicate"
    AHEAD = "ahead"
    NOT_ACTIVE = "not_active"
    CLOSED = "closed"


S, E = State, Event
TABLE: dict[tuple[State, Event], State] = {
    (S.IDLE, E.START): S.STREAMING,
    (S.IDLE, E.RACE): S.RACING,
    (S.RACING, E.WON): S.STREAMING,
    (S.RACING, E.RACER_FAILED): S.RACING,
    (S.RACING, E.LAST_RACER_FAILED): S.RECOVERING,
    (S.RACING, E.FINISH): S.FINISHED,
    (S.STREAMING, E.PREPARE): S.PREPARING,
    (S.STREAMING, E.SOURCE_FAILED): S.RECOVERING,
    (S.STREAMING, E.FINISH): S.FINISHED,
    (S.PREPARING, E.TARGET_READY): S.HANDING_OVER,
    (S.PREPARING, E.TARGET_FAILED): S.STREAMING,
    (S.PREPARING, E.SOURCE_FAILED): S.HANDING_OVER,
    (S.PREPARING, E.FINISH): S.FINISHED,
    (S.HANDING_OVER, E.TAKEN_OVER): S.STREAMING,
    (S.HANDING_OVER, E.TARGET_FAILED): S.RECOVERING,
    (S.HANDING_OVER, E.FINISH): S.FINISHED,
    (S.RECOVERING, E.RESUME): S.HANDING_OVER,
    (S.RECOVERING, E.GIVE_UP): S.FAILED,
}
TERMINAL = frozenset({S.FINISHED, S.FAILED, S.CANCELLED})
for _state in State:
    if _state not in TERMINAL:
        TABLE[(_state, E.CANCEL)] = S.CANCELLED

# Which role may commit in which state.
COMMITTER: dict[State, Role] = {
    S.RACING: Role.RACER,
    S.STREAMING: Role.SOURCE,
    S.PREPARING: Role.SOURCE,
    S.HANDING_OVER: Role.TARGET,
}


class IllegalEvent(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"illegal migration event '{event.value}' in state '{state.value}'")
        self.state = state
        self.event = event


@dataclasses.dataclass
class Counters:
    role: Role = Role.NONE
    offered: int = 0
    accepted: int = 0
    dropped: int = 0
    duplicates: int = 0


@dataclasses.dataclass
class MigrationModel:
    """The specification, executable. Committed tokens are appended to ``delivered``; the end
    record that follows them in the ring is ``ended`` (why) and ``ended_by`` (the endpoint
    that ended it, 0 for failure and cancellation), set when a terminal state is entered.
    ``transitions`` logs (event, position): the committed count when it happened, or for
    WON and TAKEN_OVER the position of the token that caused it. Positions run from 0 to
    ``max_tokens - 1`` (None: no bound); committing the last one ends the answer (LENGTH)."""

    max_tokens: int | None = None
    committed: int = 0
    state: State = State.IDLE
    migrations: int = 0
    delivered: list[tuple[int, int, str, int]] = dataclasses.field(default_factory=list)
    ended: Finish | None = None
    ended_by: int = 0
    counters: dict[int, Counters] = dataclasses.field(default_factory=dict)
    transitions: list[tuple[Event, int]] = dataclasses.field(default_factory=list)

    def _fire(self, event: Event) -> None:
        nxt = TABLE.get((self.state, event))
        if nxt is None:
            raise IllegalEvent(self.state, event)
        self.transitions.append((event, self.committed))
        self.state = nxt

    def _end(self, event: Event, reason: Finish, ended_by: int) -> None:
        self._fire(event)
        self.ended, self.ended_by = reason, ended_by

    def _c(self, ep: int) -> Counters:
        return self.counters.setdefault(ep, Counters())

    def _role(self, role: Role) -> list[int]:
        return [ep for ep, c in self.counters.items() if c.role is role]

    def start(self, ep: int) -> None:
        self._fire(E.START)
        self._c(ep).role = Role.SOURCE

    def race(self, eps: list[int]) -> None:
        if len(eps) < 2 or len(set(eps)) != len(eps):
            raise ValueError("a race needs at least two distinct endpoints")
        self._fire(E.RACE)
        for ep in eps:
            self._c(ep).role = Role.RACER

    def prepare(self, target: int) -> None:
        if (self.state, E.PREPARE) not in TABLE:
            raise IllegalEvent(self.state, E.PREPARE)
        if self._c(target).role is Role.SOURCE:
            raise IllegalEvent(self.state, E.PREPARE)
        self._fire(E.PREPARE)
        self._c(target).role = Role.TARGET

    def target_ready(self) -> int:
        self._fire(E.TARGET_READY)
        for ep in self._role(Role.SOURCE):
            self.counters[ep].role = Role.STOPPED
        return self.committed

    def endpoint_failed(self, ep: int) -> None:
        if ep not in self.counters or self.counters[ep].role is Role.NONE:
            raise ValueError(f"endpoint {ep} was never started on this answer")
        if self.state in TERMINAL:
            raise IllegalEvent(self.state, E.SOURCE_FAILED)
        role = self.counters[ep].role
        if role is Role.RACER:
            others = [e for e in self._role(Role.RACER) if e != ep]
            self._fire(E.RACER_FAILED if others else E.LAST_RACER_FAILED)
        elif role is Role.SOURCE:
            self._fire(E.SOURCE_FAILED)
        elif role is Role.TARGET:
            self._fire(E.TARGET_FAILED)
        self.counters[ep].role = Role.FAILED

    def resume(self, ep: int) -> int:
        self._fire(E.RESUME)
        self._c(ep).role = Role.TARGET
        return self.committed

    def cancel(self) -> None:
        self._end(E.CANCEL, Finish.CANCELLED, 0)

    def give_up(self) -> None:
        self._end(E.GIVE_UP, Finish.FAILED, 0)

    def _judge(self, ep: int, position: int) -> Offer:
        if self.state in TERMINAL:
            return Offer.CLOSED
        if position < self.committed:
            return Offer.DUPLICATE
        if COMMITTER.get(self.state) is not self._c(ep).role:
            return Offer.NOT_ACTIVE
        if position > self.committed:
            return Offer.AHEAD
        return Offer.COMMITTED

    def offer(self, ep: int, position: int, token_id: int, text: str) -> Offer:
        c = self._c(ep)
        c.offered += 1
        verdict = self._judge(ep, position)
        if verdict is not Offer.COMMITTED:
            c.dropped += 1
            c.duplicates += verdict is Offer.DUPLICATE
            return verdict
        c.accepted += 1
        self.delivered.append((position, token_id, text, ep))
        if self.state is S.RACING:
            self._fire(E.WON)
            for other in self._role(Role.RACER):
                self.counters[other].role = Role.STANDBY
            c.role = Role.SOURCE
        elif self.state is S.HANDING_OVER:
            self._fire(E.TAKEN_OVER)
            c.role = Role.SOURCE
            self.migrations += 1
        self.committed += 1
        if self.committed == self.max_tokens:
            self._end(E.FINISH, Finish.LENGTH, ep)
        return Offer.COMMITTED

    def offer_end(self, ep: int, position: int, reason: Finish = Finish.STOP) -> Offer:
        if reason not in (Finish.STOP, Finish.LENGTH):
            raise ValueError("an endpoint ends an answer with stop or length")
        verdict = self._judge(ep, position)
        if verdict is Offer.COMMITTED:
            self._end(E.FINISH, reason, ep)
        return verdict
