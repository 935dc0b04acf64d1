"""Starting an answer as the dispatch policy decided: one endpoint, a race (the first token
wins), a delayed fallback (DiSCo-D's ``w(l)``), or a P/D-Device handoff (the cloud starts, the
device prepares from the start and takes over after the cloud's first K tokens)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from .._types import Endpoint
from ..observability._logging import get_logger
from ..policies._base import DispatchDecision
from ._answer import Answer, Role, State
from ._handover import AnswerFailed, Handover
from ._supervision import Runs

log = get_logger("pydisco.runtime")


class Dispatch:
    def __init__(
        self,
        decision: DispatchDecision,
        answer: Answer,
        endpoints: Mapping[str, Endpoint],
        runs: Runs,
        handover: Handover,
        on_handoff_done: Callable[[], None],
    ) -> None:
        self.decision = decision
        self._answer = answer
        self._runs = runs
        self._handover = handover
        self._on_handoff_done = on_handoff_done
        self._start: list[str] = [e for e in decision.start if e in endpoints]
        fallback = decision.fallback
        self._fallback = fallback if fallback is not None and fallback[0] in endpoints and fallback[0] not in self._start else None
        self._handoff = decision.handoff if "device" in endpoints and "device" not in self._start else None
        if not self._start:
            raise AnswerFailed(f"the dispatch decision names no available endpoint: {decision.reason or decision}")

    def start(self, nursery: trio.Nursery) -> None:
        """Start what the decision says; the race and the fallback then run as tasks."""
        racers: list[str] = self._start + ([self._fallback[0]] if self._fallback else [])
        if len(racers) == 1:
            self._answer.start(racers[0])
        else:
            self._answer.race(racers)
            log.info("race between %s", " and ".join(racers))
        for name in self._start:
            self._runs.launch(name, 0)
        if len(racers) > 1:
            nursery.start_soon(self._settle_race, racers, name="pydisco race")
        if self._fallback is not None:
            nursery.start_soon(self._fallback_after, *self._fallback, name="pydisco fallback")
        if self._handoff is not None:
            cloud_tokens = self._handoff.cloud_tokens
            log.info("P/D handoff planned: the device prepares and takes over after %d cloud tokens", cloud_tokens)
            self._handover.begin(
                "device",
                ready_when=lambda: self._answer.committed >= cloud_tokens,
                on_taken_over=self._on_handoff_done,
            )

    async def _settle_race(self, racers: list[str]) -> None:
        """The first racer to commit wins; the machine makes the others standbys, and they stop
        (their offers are dropped anyway). Asked of the roles, not of who commits now: by the
        time this runs the winner may have failed and a standby been resumed."""
        answer = self._answer
        await answer.wait_until(lambda: answer.state != State.RACING)
        if answer.source is not None:
            log.info("%s won the race", answer.source)
        for name in racers:
            if answer.role(name) == Role.STANDBY:
                self._runs.stop(name)

    async def _fallback_after(self, name: str, wait_s: float) -> None:
        """DiSCo-D: start ``name`` if no token has arrived after ``wait_s`` — or at once when every
        endpoint started before it has failed (waiting longer cannot help)."""
        answer = self._answer
        with trio.move_on_at(answer.clock.trio_time(answer.started_ns + round(wait_s * 1e9))):
            await answer.wait_until(
                lambda: answer.state != State.RACING or all(answer.has_failed(n) for n in self._start)
            )
        if answer.state == State.RACING and answer.committed == 0:
            why = "every endpoint started before it failed" if all(answer.has_failed(n) for n in self._start) else f"no token within {wait_s * 1e3:.0f} ms"
            log.info("fallback to %s: %s", name, why)
            self._runs.launch(name, 0)
