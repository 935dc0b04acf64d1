"""One answer, end to end.

The token path is one straight line::

    endpoint run ──offer──▶ MigrationMachine ──commit──▶ committed ring ──▶ Pacer ──▶ released ring ──▶ reader
    (_supervision)          (C++: exactly once,         (C++)              (C++ thread   (C++)             (Trio task, blocking
                             in order; ends with                            or Trio task)                   thread, C++ consumer)
                             an end record)

Around it, small units with one job each, all reading the answer's state from the machine
(``_answer.Answer``) and changing it only through it:

* ``Dispatch`` starts the answer as the dispatch policy decided (one endpoint, a race, DiSCo-D's
  delayed fallback, a P/D-Device handoff);
* ``Runs`` supervises each endpoint's run with its first-token and silence deadlines;
* ``Handover`` moves the answer to another endpoint (migration, P/D's plan) and decides what a
  failure leads to (failover, or the answer fails);
* ``MigrationTrigger`` asks the migration policy after every commit and standby sync;
* ``DeviceStandby`` keeps the device's KV cache following the committed prefix while the cloud
  decodes;
* the report is derived from the machine's and the pacer's logs (``_report.build_report``).
No concrete policy is named here: policies are asked through their interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import trio

from .. import _core
from .._types import Endpoint, GenerationRequest
from ..observability._logging import get_logger
from ..policies._base import AnswerOutcome, DispatchDecision, MigrationPolicy, Slo
from ._answer import ENDPOINT_IDS, ENDPOINT_NAMES, Answer
from ._dispatch import Dispatch
from ._handover import AnswerFailed, Handover
from ._health import Health
from ._migration import MigrationFacts, MigrationTrigger
from ._reader import AnswerReader
from ._report import AnswerReport, AnswerStatus, Piece, build_report
from ._standby import DeviceStandby
from ._supervision import Deadlines, Runs, Usage

__all__ = ["ENDPOINT_IDS", "AnswerCoordinator", "AnswerFailed", "AnswerSettings"]

log = get_logger("pydisco.runtime")


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    """What the runtime fixes for each answer (from RuntimeConfig and the request)."""

    slo: Slo
    pace: bool  # release at the reading rate (Andes' client pacer) or as soon as committed
    virtual_time: bool
    realtime_pacer: bool
    deadlines: Deadlines
    cost_per_token: Mapping[str, float]
    prefill_cost_per_token: Mapping[str, float]
    # Do device and cloud share token ids (resume by ids, else by text)? Asked at each resume:
    # the cloud names its model only once connected.
    same_vocabulary: Callable[[], bool]
    device_standby: bool = True  # the config's switch; the dispatch decision has the other
    pacer_spin_s: float = 0.0015  # see RuntimeConfig
    reader_handoff_s: float = 0.0003  # see RuntimeConfig


class AnswerCoordinator:
    """Drives one answer: ``run()`` in a task, the reader's side from the application."""

    def __init__(
        self,
        request: GenerationRequest,
        *,
        endpoints: Mapping[str, Endpoint],
        decision: DispatchDecision,
        migration: MigrationPolicy,
        settings: AnswerSettings,
        facts: MigrationFacts,
        health: Health,
    ) -> None:
        if not any(e in endpoints for e in decision.start):
            raise AnswerFailed(f"the dispatch decision names no available endpoint: {decision.reason or decision}")
        self._endpoints = dict(endpoints)
        self._decision = decision
        self._migration = migration
        self._settings = settings
        self._facts = facts
        self._health = health
        self._reading_interval_ns = round(1e9 / settings.slo.reading_rate) if settings.pace else 0
        # P/D-Device paces the cloud's first tokens at its own interval, then at the reader's.
        interval = self._reading_interval_ns if decision.handoff is None else round(decision.handoff.interval_s * 1e9)
        self.answer = Answer(
            request, interval_ns=interval, virtual_time=settings.virtual_time,
            spin_ns=round(settings.pacer_spin_s * 1e9), handoff_lead_ns=round(settings.reader_handoff_s * 1e9),
        )  # fmt: skip
        self._usage = Usage()
        self._releases: list[_core.ReleaseRecord] = []  # drained from the pacer's log
        # The units, made when the answer starts (they need its nursery).
        self._runs: Runs | None = None
        self._handover: Handover | None = None
        self._trigger: MigrationTrigger | None = None
        self._reader = AnswerReader(
            self.answer.pacer, ENDPOINT_NAMES, self.answer.started_ns, lambda: self.error, driver=self.answer.virtual_pacer
        )

    # -- the answer's life --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the answer to its end. On cancellation every endpoint run is cancelled and the
        machine records the cancellation (its end record follows the committed tokens)."""
        answer, settings = self.answer, self._settings
        log.info("dispatch: %s (prompt %d tokens)", self._decision.reason or _describe(self._decision), self._facts.prompt_tokens)
        if not settings.virtual_time:
            answer.pacer.start(realtime=settings.realtime_pacer)
        try:
            async with trio.open_nursery() as nursery:
                self._wire(nursery)
                task_status.started()
                await answer.wait_until(lambda: answer.ended)
                assert self._runs is not None
                self._runs.stop_all()
                await self._drain_virtual_pacer()
                nursery.cancel_scope.cancel()
        except BaseException:
            answer.cancel()
            raise

    def _wire(self, nursery: trio.Nursery) -> None:
        answer, settings, endpoints = self.answer, self._settings, self._endpoints
        by_token_ids = settings.same_vocabulary
        runs = Runs(
            answer, endpoints, settings.deadlines, self._usage, self._facts.prompt_tokens, by_token_ids,
            nursery, on_failure=self._endpoint_failed, on_commit=self._committed, health=self._health,
            slo=settings.slo,
        )  # fmt: skip
        handover = Handover(answer, endpoints, runs, self._usage, by_token_ids, nursery, self._health)
        device = endpoints.get("device")
        standby: DeviceStandby | None = None
        if settings.device_standby and self._decision.device_standby and "cloud" in endpoints and DeviceStandby.possible(device):
            assert device is not None
            standby = DeviceStandby(answer, device, runs, self._usage, by_token_ids, on_synced=self._committed)
        self._runs, self._handover = runs, handover
        self._trigger = MigrationTrigger(
            self._migration, self._facts, answer, endpoints, handover,
            device_synced=lambda: standby.synced if standby is not None else None, health=self._health,
        )  # fmt: skip
        if answer.virtual_pacer is not None:
            nursery.start_soon(answer.virtual_pacer.run, name="pydisco virtual pacer")
        Dispatch(self._decision, answer, endpoints, runs, handover, on_handoff_done=self._pace_for_reader).start(nursery)
        if standby is not None:
            nursery.start_soon(standby.run, name="pydisco device standby")

    def _endpoint_failed(self, name: str, error: BaseException) -> None:
        assert self._handover is not None
        self._handover.endpoint_failed(name, error)

    def _committed(self) -> None:
        """After a commit or a standby sync: the one place the migration decision is taken.
        P/D-Device hands over by its own plan instead."""
        if self._decision.handoff is None and self._trigger is not None:
            self._trigger.consider()

    def _pace_for_reader(self) -> None:
        """P/D-Device's cloud phase is over: pace at the reader's rate (or as committed)."""
        self.answer.pacer.set_interval_ns(self._reading_interval_ns)
        if self.answer.virtual_pacer is not None:
            self.answer.virtual_pacer.notify()

    async def _drain_virtual_pacer(self) -> None:
        """In virtual time the pacer is a task of this nursery: let it release everything
        (the end record last) before the nursery goes. A real-time pacer thread goes on until
        ``close()``."""
        if self.answer.virtual_pacer is not None:
            await self.answer.virtual_pacer.wait_drained()

    def close(self) -> None:
        """Stop the pacer thread and hand whatever is still committed to the reader at once, so
        any reader (a blocking thread, a C++ consumer) sees the end record. Idempotent."""
        pacer, driver = self.answer.pacer, self.answer.virtual_pacer
        pacer.stop()
        if driver is not None:
            driver.release_all(self.answer.clock.now_ns())
        else:
            pacer.release_all(self.answer.clock.now_ns())

    # -- the reader's side --------------------------------------------------------------

    async def next_piece(self) -> Piece | None:
        """See ``AnswerReader.next_piece``."""
        return await self._reader.next_piece()

    @property
    def released_ring(self) -> _core.TokenRing:
        """The ring the pacer releases into (its single consumer is the reader)."""
        return self.answer.released_ring

    def final_count(self) -> int | None:
        """How many tokens the answer has, once it has ended (else None)."""
        return self.answer.committed if self.answer.ended else None

    @property
    def error(self) -> BaseException | None:
        """Why the answer failed, if it did."""
        if self.answer.machine.finish_reason != _core.FinishReason.FAILED or self._handover is None:
            return None
        return self._handover.error

    def status(self) -> AnswerStatus:
        answer = self.answer
        committed, consumed = answer.committed, answer.consumed()
        return AnswerStatus(
            state=answer.state.name.lower(),
            generating=answer.source,
            committed=committed,
            consumed=consumed,
            unread=committed - consumed,
            elapsed_s=answer.seconds(answer.clock.now_ns()),
        )

    # -- what is learnt from it ---------------------------------------------------------

    def report(self) -> AnswerReport:
        """The report as of now (complete once the answer ended and was released). Call from the
        Trio thread: it drains the pacer's release log, which has one consumer."""
        self._releases.extend(self.answer.pacer.take_releases())
        slo = self._settings.slo
        return build_report(
            answer_id=self.answer.request.request_id,
            machine=self.answer.machine,
            releases=self._releases,
            names=ENDPOINT_NAMES,
            started_ns=self.answer.started_ns,
            prefilled=self._usage.prefilled,
            cost_per_token=self._settings.cost_per_token,
            prefill_cost_per_token=self._settings.prefill_cost_per_token,
            dispatch=self._decision.reason or _describe(self._decision),
            ttft_target_s=slo.ttft_target_s,
            reading_rate=slo.reading_rate,
        )

    def outcome(self) -> AnswerOutcome:
        """What the dispatch policy learns from this answer."""
        machine = self.answer.machine
        tokens: dict[str, int] = {}
        for name, ep in ENDPOINT_IDS.items():
            c = machine.counters(ep)
            if c.role != _core.EndpointRole.NONE or c.offered:
                tokens[name] = self._usage.prefilled[name] + c.offered
        cloud_ttft = self._runs.cloud_ttft_s if self._runs is not None else None
        return AnswerOutcome(prompt_tokens=self._facts.prompt_tokens, tokens_by_endpoint=tokens, cloud_ttft_s=cloud_ttft)


def _describe(decision: DispatchDecision) -> str:
    parts = ["start " + "+".join(decision.start)]
    if decision.fallback is not None:
        parts.append(f"{decision.fallback[0]} after {decision.fallback[1] * 1e3:.0f} ms without a token")
    if decision.handoff is not None:
        parts.append(f"handoff after {decision.handoff.cloud_tokens} cloud tokens at {decision.handoff.interval_s * 1e3:.1f} ms")
    return ", ".join(parts)
