"""One answer, end to end: dispatch, offers into the migration machine, migration, failover,
pacing, and the report.

The coordinator owns the answer's native objects (committed ring, migration machine, pacer,
released ring) and one Trio task per running endpoint. Endpoint tasks only *offer* tokens;
the machine decides what is committed, so handovers and failovers cannot repeat or skip a
token. Policies are asked by interface (pydisco.policies._base); no concrete policy is named
here.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Mapping

import trio

from .. import _core
from .._errors import EndpointError, PydiscoError
from ._pacing import ReleasedTokens, VirtualTimePacer, trio_time_ns
from ._report import AnswerReport, EndpointUsage, MigrationRecord, Piece
from .._types import Endpoint, GenerationRequest, GenerationResult, TokenPiece
from ..policies._base import (
    AnswerOutcome,
    DeviceSpeed,
    DispatchDecision,
    MigrationPolicy,
    MigrationView,
    Slo,
)
from ..qoe import qoe as andes_qoe

ENDPOINT_IDS: dict[str, int] = {"device": 1, "cloud": 2}
ENDPOINT_NAMES: dict[int, str] = {v: k for k, v in ENDPOINT_IDS.items()}
LATE_THRESHOLD_NS = 1_000_000  # a token more than 1 ms past its pacing deadline counts as late


class AnswerFailed(PydiscoError):
    """No endpoint could finish the answer. The tokens already delivered stay valid."""


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    """What the runtime fixes for each answer (from RuntimeConfig and the request)."""

    slo: Slo
    pace: bool  # release at the reading rate (Andes' client pacer) or as soon as committed
    virtual_time: bool
    realtime_pacer: bool
    first_token_timeout_s: float
    silence_timeout_s: float
    max_migrations: int
    cost_per_token: Mapping[str, float]
    # Do device and cloud share token ids (resume by ids, else by text)? Asked at each resume:
    # the cloud names its model only once connected.
    same_vocabulary: Callable[[], bool]
    # While the cloud decodes, keep the device's KV cache following the committed prefix, so
    # a failover or migration to the device computes only the last few tokens.
    device_standby: bool = True


class _Clock:
    """The answer's one time base: native CLOCK_MONOTONIC ns, or Trio's clock in virtual time."""

    def __init__(self, virtual: bool) -> None:
        self.virtual = virtual

    def now_ns(self) -> int:
        return trio_time_ns() if self.virtual else _core.now_ns()

    def trio_deadline(self, at_ns: int) -> float:
        if self.virtual:
            return at_ns / 1e9
        return trio.current_time() + (at_ns - _core.now_ns()) / 1e9


@dataclasses.dataclass
class _Run:
    """One endpoint working on this answer."""

    name: str
    scope: trio.CancelScope
    start_position: int
    last_progress_ns: int
    started_ns: int = 0
    result: GenerationResult | None = None
    offered: int = 0
    active: bool = True


@dataclasses.dataclass
class _Handover:
    """A handover under way: decided (migration) or forced (failover), not yet taken over."""

    kind: str
    decided_ns: int
    source: str = "?"
    handover_ns: int | None = None
    position: int = 0


class AnswerCoordinator:
    def __init__(
        self,
        request: GenerationRequest,
        *,
        endpoints: Mapping[str, Endpoint],
        decision: DispatchDecision,
        migration: MigrationPolicy,
        settings: AnswerSettings,
        prompt_tokens: int,
        device_speed: DeviceSpeed | None,
        cloud_ttft_estimate_s: float,
        expected_total_tokens: float,
    ) -> None:
        self._request = request
        self._endpoints = dict(endpoints)
        self._decision = decision
        self._migration = migration
        self._settings = settings
        self._prompt_tokens = prompt_tokens
        self._device_speed = device_speed
        self._cloud_ttft_estimate_s = cloud_ttft_estimate_s
        self._expected_total = expected_total_tokens
        self._clock = _Clock(settings.virtual_time)

        capacity = 1 << max(4, math.ceil(math.log2(request.max_tokens + 16)))
        self._committed = _core.TokenRing(capacity)
        self._released = _core.TokenRing(capacity)
        self._machine = _core.MigrationMachine(self._committed)
        self._reading_interval_ns = round(1e9 / settings.slo.reading_rate) if settings.pace else 0
        # P/D-Device paces the cloud's first tokens at its own interval, then at the reader's.
        interval = self._reading_interval_ns if decision.handoff is None else round(decision.handoff.interval_s * 1e9)
        self._pacer = _core.Pacer(self._committed, self._released, interval_ns=interval)
        self._virtual_pacer = VirtualTimePacer(self._pacer) if settings.virtual_time else None

        self._runs: dict[str, _Run] = {}
        self._failed: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._start_ns = 0
        self._finish_reason: str | None = None
        self._error: BaseException | None = None
        self._done = trio.Event()
        self._prefilled: collections.Counter[str] = collections.Counter()
        self._migrations: list[MigrationRecord] = []
        self._pending_handover: _Handover | None = None
        self._preparing: str | None = None
        self._prepared: set[str] = set()

        # the reader's side
        self._receiver = ReleasedTokens(self._pacer)
        self._pieces: collections.deque[Piece] = collections.deque()
        self._all: list[Piece] = []
        self._reader_scope: trio.CancelScope | None = None
        self._lateness_log: list[int] = []
        self._cloud_ttft_s: float | None = None
        self._standby_scope: trio.CancelScope | None = None
        self._standby_wakeup = trio.Event()
        self._standby_synced: int | None = None  # answer tokens the device's cache holds
        self._commit_wakeup = trio.Event()  # set (and replaced) at every commit

    # ------------------------------------------------------------------ the answer's life

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the answer to its end. On cancellation every endpoint task is cancelled and
        the machine records the cancellation; tokens already committed stay readable."""
        self._start_ns = self._clock.now_ns()
        if not self._settings.virtual_time:
            self._pacer.start(realtime=self._settings.realtime_pacer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._virtual_pacer is not None:
                    nursery.start_soon(self._virtual_pacer.run)
                self._dispatch_start(nursery)
                task_status.started()
                nursery.start_soon(self._watchdog)
                await self._done.wait()
                for run in self._runs.values():
                    run.scope.cancel()
                await self._drain_virtual_pacer()
                nursery.cancel_scope.cancel()
        except BaseException as e:
            if not _core_terminal(self._machine.state):
                self._machine.cancel(now_ns=self._clock.now_ns())
                self._finish_reason = self._finish_reason or "cancelled"
            if not isinstance(e, trio.Cancelled):
                self._error = self._error or e
            raise
        finally:
            self._nursery = None
            self._wake_reader()

    async def _drain_virtual_pacer(self) -> None:
        """In virtual time the pacer is a task of this nursery: let it release what is
        committed before the nursery goes. (A real-time pacer thread runs until close().)"""
        if self._virtual_pacer is None:
            return
        while (deadline := self._pacer.next_deadline()) is not None:
            await trio.sleep_until(self._clock.trio_deadline(deadline))
            await trio.lowlevel.checkpoint()  # the pacer task releases it

    def _dispatch_start(self, nursery: trio.Nursery) -> None:
        now = self._clock.now_ns()
        start = [e for e in self._decision.start if e in self._endpoints]
        fallback = self._decision.fallback
        if fallback is not None and fallback[0] not in self._endpoints:
            fallback = None
        if not start:
            raise AnswerFailed(f"the dispatch decision names no available endpoint: {self._decision}")
        racers = start + ([fallback[0]] if fallback and fallback[0] not in start else [])
        if len(racers) == 1:
            self._machine.start(ENDPOINT_IDS[racers[0]], now_ns=now)
        else:
            self._machine.race([ENDPOINT_IDS[r] for r in racers], now_ns=now)
        for name in start:
            self._launch(name, 0)
        if fallback is not None and fallback[0] not in start:
            nursery.start_soon(self._fallback_after, fallback[0], fallback[1])
        if self._decision.handoff is not None and "device" in self._endpoints and "device" not in start:
            # P/D-Device: the device prefills the prompt while the cloud streams its first K.
            self._begin_prepare("device", decided_ns=now)

    async def _fallback_after(self, name: str, wait_s: float) -> None:
        """DiSCo-D: start ``name`` only if no token has arrived after ``wait_s``."""
        await trio.sleep_until(self._clock.trio_deadline(self._start_ns + round(wait_s * 1e9)))
        if self._machine.committed == 0 and self._machine.state == _core.MigrationState.RACING:
            self._launch(name, 0)

    # ------------------------------------------------------------------ endpoint tasks

    def _resume_request(self, position: int) -> GenerationRequest:
        # max_tokens bounds the whole answer (resumed prefix included), so it stays as asked.
        base = self._request
        if position == 0:
            return base
        # Endpoints always (re)start at the committed position: nothing commits between a
        # handover decision and the target's first token, so the whole committed text is it.
        assert position == self._machine.committed, (position, self._machine.committed)
        ids = tuple(self._machine.committed_token_ids[:position])
        if self._settings.same_vocabulary() and all(i >= 0 for i in ids):
            return dataclasses.replace(base, resume_token_ids=ids, resume_text=None, resume_position=None)
        return dataclasses.replace(
            base,
            resume_token_ids=(),
            resume_text=self._machine.committed_text,
            resume_position=position,
        )

    def _launch(self, name: str, position: int) -> None:
        assert self._nursery is not None
        if position >= self._request.max_tokens:
            return
        now = self._clock.now_ns()
        run = _Run(name, trio.CancelScope(), position, last_progress_ns=now, started_ns=now)
        self._runs[name] = run
        self._nursery.start_soon(self._run_endpoint, run)

    async def _run_endpoint(self, run: _Run) -> None:
        endpoint = self._endpoints[run.name]
        ep_id = ENDPOINT_IDS[run.name]
        request = self._resume_request(run.start_position)
        if run.name == "device":
            self._stop_standby()
        with run.scope:
            try:
                result = await endpoint.generate(request, lambda piece: self._offer(run, ep_id, piece))
            except (EndpointError, trio.BrokenResourceError, OSError) as e:
                self._on_failure(run.name, e)
                return
            run.result = result
            self._prefilled[run.name] += result.prefilled_tokens
            end = run.start_position + result.generated_tokens
            verdict = self._machine.offer_end(ep_id, end, now_ns=self._clock.now_ns())
            if verdict == _core.OfferResult.COMMITTED:
                self._finish(result.finish_reason)
        run.active = False
        if run.scope.cancelled_caught and run.result is None:
            # Stopped by us (lost race, handover, silence): count the prompt it prefilled.
            self._prefilled[run.name] += self._prompt_tokens if run.start_position == 0 else 0

    def _offer(self, run: _Run, ep_id: int, piece: TokenPiece) -> None:
        now = self._clock.now_ns()
        if run.offered == 0 and run.start_position == 0 and run.name == "cloud":
            self._cloud_ttft_s = (now - run.started_ns) / 1e9  # what DiSCo-D learns F_s from
        run.offered += 1
        run.last_progress_ns = now
        before = self._machine.state
        verdict = self._machine.offer(ep_id, piece.position, piece.token_id, piece.text, now_ns=now)
        if verdict == _core.OfferResult.BACKPRESSURE:  # rings hold max_tokens: cannot happen
            raise RuntimeError("committed ring full: the answer is longer than max_tokens")
        if verdict != _core.OfferResult.COMMITTED:
            return
        if self._virtual_pacer is not None:
            self._virtual_pacer.notify()
        self._commit_wakeup.set()
        self._commit_wakeup = trio.Event()
        if before == _core.MigrationState.RACING:
            self._stop_others(run.name)  # the race is won
        elif before == _core.MigrationState.HANDING_OVER:
            self._on_taken_over(run.name, now)
        self._maybe_migrate(now)
        self._keep_standby(run.name)

    def _stop_others(self, winner: str) -> None:
        for name, run in self._runs.items():
            if name != winner and name != self._preparing:
                run.scope.cancel()

    # ------------------------------------------------------------------ device standby

    def _keep_standby(self, committer: str) -> None:
        """After a cloud commit: make sure the device follows the committed prefix."""
        if (
            not self._settings.device_standby
            or committer != "cloud"
            or "device" not in self._endpoints
            or "device" in self._failed
            or self._preparing == "device"
            or self._machine.state != _core.MigrationState.STREAMING
            or getattr(self._endpoints["device"], "prepare", None) is None
        ):
            return
        device_run = self._runs.get("device")
        if device_run is not None and device_run.active:
            return  # still racing (or being cancelled): its own prefill is under way
        self._standby_wakeup.set()
        if self._standby_scope is None and self._nursery is not None:
            self._standby_scope = trio.CancelScope()
            self._nursery.start_soon(self._follow_on_device, self._standby_scope)

    async def _follow_on_device(self, scope: trio.CancelScope) -> None:
        """Prefill the device with the committed prefix, again each time it has grown."""
        prepare = getattr(self._endpoints["device"], "prepare")
        with scope:
            while True:
                await self._standby_wakeup.wait()
                self._standby_wakeup = trio.Event()
                position = self._machine.committed
                try:
                    self._prefilled["device"] += await prepare(self._resume_request(position))
                except (EndpointError, trio.BrokenResourceError, OSError):
                    return  # a failed standby is not a failed answer; the device may still serve
                self._standby_synced = position

    def _stop_standby(self) -> None:
        if self._standby_scope is not None:
            self._standby_scope.cancel()
            self._standby_scope = None

    # ------------------------------------------------------------------ migration

    def _maybe_migrate(self, now: int) -> None:
        m = self._machine
        if m.state != _core.MigrationState.STREAMING or len(self._migrations) >= self._settings.max_migrations:
            return
        source_id = m.source
        if source_id is None:
            return
        source = ENDPOINT_NAMES[source_id]
        target = "device" if source == "cloud" else "cloud"
        if target not in self._endpoints or target in self._failed:
            return
        committed = m.committed
        handoff = self._decision.handoff
        if handoff is not None:
            return  # P/D-Device hands over by its own plan (prepared from the start)
        view = MigrationView(
            now_s=(now - self._start_ns) / 1e9,
            source=source,  # type: ignore[arg-type]
            target=target,  # type: ignore[arg-type]
            prompt_tokens=self._prompt_tokens,
            committed=committed,
            unread=committed - self._consumed(),
            reading_rate=self._settings.slo.reading_rate,
            max_tokens=self._request.max_tokens,
            expected_total_tokens=self._expected_total,
            target_ready_s=self._target_ready_estimate(target, committed),
            cost_per_token=self._settings.cost_per_token,
            migration_overhead_cost=self._settings.cost_per_token.get(target, 0.0) * self._catch_up_tokens(target, committed),
            target_available=True,
        )
        if self._migration.should_migrate(view):
            self._begin_prepare(target, decided_ns=now)

    def _catch_up_tokens(self, target: str, committed: int) -> int:
        """Tokens the target must prefill to take over at ``committed``."""
        if target == "device" and self._standby_synced is not None:
            return committed - self._standby_synced  # its cache holds prompt + synced tokens
        return self._prompt_tokens + committed

    def _target_ready_estimate(self, target: str, committed: int) -> float:
        if target == "device" and self._device_speed is not None:
            return self._device_speed.prefill(self._catch_up_tokens(target, committed))
        return self._cloud_ttft_estimate_s

    def _begin_prepare(self, target: str, *, decided_ns: int) -> None:
        assert self._nursery is not None
        if self._machine.state == _core.MigrationState.STREAMING:
            self._machine.prepare(ENDPOINT_IDS[target], now_ns=decided_ns)
        self._preparing = target
        if target == "device":
            self._stop_standby()
        self._pending_handover = _Handover("migration", decided_ns)
        self._nursery.start_soon(self._prepare_and_hand_over, target)

    async def _prepare_and_hand_over(self, target: str) -> None:
        endpoint = self._endpoints[target]
        prepare = getattr(endpoint, "prepare", None)
        if prepare is not None:
            try:
                prefix = self._resume_request(self._machine.committed)
                self._prefilled[target] += await prepare(prefix)
            except (EndpointError, trio.BrokenResourceError, OSError) as e:
                self._on_failure(target, e)
                return
        self._prepared.add(target)
        handoff = self._decision.handoff
        if handoff is not None:
            # P/D-Device: hand over once the cloud has delivered its K tokens.
            while (
                self._machine.state == _core.MigrationState.PREPARING
                and self._machine.committed < handoff.cloud_tokens
            ):
                await self._commit_wakeup.wait()
        state = self._machine.state
        now = self._clock.now_ns()
        if state == _core.MigrationState.PREPARING:
            source = self._machine.source
            position = self._machine.target_ready(now_ns=now)
            if source is not None and ENDPOINT_NAMES[source] in self._runs:
                self._runs[ENDPOINT_NAMES[source]].scope.cancel()
            self._note_handover(ENDPOINT_NAMES[source] if source is not None else "?", now)
            self._launch(target, position)
        elif state == _core.MigrationState.HANDING_OVER:
            # The source failed while the target prepared: continue from the committed prefix.
            self._launch(target, self._machine.committed)

    def _note_handover(self, source: str, now: int) -> None:
        """The source stopped (or failed) at the committed position, now."""
        pending = self._pending_handover or _Handover("failover", now)
        pending.source, pending.handover_ns, pending.position = source, now, self._machine.committed
        self._pending_handover = pending

    def _on_taken_over(self, target: str, now: int) -> None:
        p = self._pending_handover
        self._preparing = None
        self._pending_handover = None
        if p is None:
            return
        start = self._start_ns
        self._migrations.append(
            MigrationRecord(
                kind=p.kind,
                source=p.source,
                target=target,
                decided_s=(p.decided_ns - start) / 1e9,
                handover_s=((p.handover_ns if p.handover_ns is not None else now) - start) / 1e9,
                taken_over_s=(now - start) / 1e9,
                handover_position=p.position,
            )
        )
        if self._decision.handoff is not None:
            # After P/D-Device's cloud phase, pace at the reader's rate (or as committed).
            self._pacer.set_interval_ns(self._reading_interval_ns)
            if self._virtual_pacer is not None:
                self._virtual_pacer.notify()

    # ------------------------------------------------------------------ failures

    def _on_failure(self, name: str, error: BaseException) -> None:
        if _core_terminal(self._machine.state):
            return
        self._failed.add(name)
        run = self._runs.get(name)
        if run is not None:
            run.scope.cancel()
        now = self._clock.now_ns()
        state_before = self._machine.state
        role = self._machine.counters(ENDPOINT_IDS[name]).role
        if role == _core.EndpointRole.NONE:
            return
        self._machine.endpoint_failed(ENDPOINT_IDS[name], now_ns=now)
        state = self._machine.state
        other = "device" if name == "cloud" else "cloud"
        if state == _core.MigrationState.HANDING_OVER and state_before == _core.MigrationState.PREPARING:
            # Failover onto the target that was already preparing.
            self._pending_handover = _Handover("failover", now)
            self._note_handover(name, now)
            if other in self._prepared:
                self._launch(other, self._machine.committed)
        elif state == _core.MigrationState.RECOVERING:
            if other in self._endpoints and other not in self._failed:
                position = self._machine.resume(ENDPOINT_IDS[other], now_ns=now)
                self._pending_handover = _Handover("failover", now)
                self._note_handover(name, now)
                self._launch(other, position)
            else:
                self._machine.give_up(now_ns=now)
                self._error = AnswerFailed(f"no endpoint can continue the answer after {name} failed: {error}")
                self._error.__cause__ = error
                self._finish("failed")
        elif state == _core.MigrationState.RACING:
            pass  # another racer is still running

    async def _watchdog(self) -> None:
        """An endpoint that commits nothing for too long is treated as failed (a silent link)."""
        while True:
            m = self._machine
            committer: str | None = None
            if m.state in (_core.MigrationState.STREAMING, _core.MigrationState.PREPARING) and m.source is not None:
                committer = ENDPOINT_NAMES[m.source]
            elif m.state == _core.MigrationState.HANDING_OVER and m.target is not None:
                committer = ENDPOINT_NAMES[m.target]
            run = self._runs.get(committer) if committer else None
            timeout_s = self._settings.silence_timeout_s
            if run is not None and m.committed == run.start_position:
                timeout_s = self._settings.first_token_timeout_s
            if run is not None and committer is not None and committer not in self._failed:
                deadline = run.last_progress_ns + round(timeout_s * 1e9)
                if self._clock.now_ns() >= deadline:
                    self._on_failure(committer, EndpointError(f"{committer} silent for {timeout_s:.2f} s", code="timeout"))
                    continue
                await trio.sleep_until(self._clock.trio_deadline(min(deadline, self._clock.now_ns() + 50_000_000)))
            else:
                await trio.sleep_until(self._clock.trio_deadline(self._clock.now_ns() + 50_000_000))

    def _finish(self, reason: str) -> None:
        self._finish_reason = reason
        self._done.set()
        self._wake_reader()

    # ------------------------------------------------------------------ the reader

    def _wake_reader(self) -> None:
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._released.wake_consumer()  # a native consumer blocked in pop_wait looks again

    def final_count(self) -> int | None:
        """How many tokens the answer has, once it has ended (else None)."""
        if _core_terminal(self._machine.state) or self._done.is_set():
            return self._machine.committed
        return None

    def _consumed(self) -> int:
        """Tokens the reader has taken: popped from the released ring, less any still queued
        in this object for next_piece."""
        return self._released.statistics().popped - len(self._pieces)

    @property
    def released_ring(self) -> _core.TokenRing:
        """The ring the pacer releases into (its single consumer is the reader)."""
        return self._released

    @property
    def error(self) -> BaseException | None:
        """Why the answer failed, if it did."""
        return self._error if self._finish_reason == "failed" else None

    def piece_from(self, token: _core.Token) -> Piece:
        return Piece(
            position=token.position,
            text=token.text,
            token_id=token.token_id,
            endpoint=ENDPOINT_NAMES.get(token.source, str(token.source)),
            released_s=(token.released_ns - self._start_ns) / 1e9,
        )

    def record_delivered(self, pieces: list[Piece]) -> None:
        """A reader outside this object (the blocking API) reports what it delivered, for the
        report's timing and QoE."""
        self._all.extend(pieces)

    async def next_piece(self) -> Piece | None:
        """The next released token, or None at the end. Raises AnswerFailed (after every
        committed token was delivered) when no endpoint could finish. On cancellation nothing
        is lost: the token stays queued."""
        while not self._pieces:
            total = self.final_count()
            if total is not None and self._consumed() >= total:
                if self.error is not None:
                    raise self.error
                return None
            with trio.CancelScope() as scope:
                self._reader_scope = scope
                try:
                    # Checked again with no checkpoint before the wait, so a finish that
                    # happened meanwhile cannot be missed.
                    total = self.final_count()
                    if total is not None and self._consumed() >= total:
                        continue
                    batch = await self._receiver.receive()
                finally:
                    self._reader_scope = None
            if scope.cancelled_caught:
                continue
            for token in batch:
                piece = self.piece_from(token)
                self._pieces.append(piece)
                self._all.append(piece)
            self._maybe_migrate(self._clock.now_ns())  # the unread buffer changed
        return self._pieces.popleft()

    def close(self) -> None:
        """Stop the pacer thread (idempotent)."""
        self._pacer.stop()

    # ------------------------------------------------------------------ the report

    def report(self) -> AnswerReport:
        pieces = self._all
        times = [p.released_s for p in pieces]
        tbt = tuple(b - a for a, b in zip(times, times[1:]))
        slo = self._settings.slo
        lateness = self._pacer.take_lateness()
        self._lateness_log.extend(lateness)
        usage: dict[str, EndpointUsage] = {}
        for name in self._endpoints:
            c = self._machine.counters(ENDPOINT_IDS[name])
            if c.role == _core.EndpointRole.NONE and c.offered == 0:
                continue
            prefilled = self._prefilled[name]
            rate = self._settings.cost_per_token.get(name, 0.0)
            usage[name] = EndpointUsage(
                generated_tokens=c.accepted,
                offered_tokens=c.offered,
                prefilled_tokens=prefilled,
                cost=rate * (prefilled + c.offered),
            )
        used: list[str] = []
        for p in pieces:
            if p.endpoint not in used:
                used.append(p.endpoint)
        return AnswerReport(
            text="".join(p.text for p in pieces),
            tokens=len(pieces),
            finish_reason=self._finish_reason or "cancelled",
            dispatch=self._decision.reason or _describe(self._decision),
            ttft_s=times[0] if times else None,
            tbt_s=tbt,
            qoe=andes_qoe(times, ttft_target_s=slo.ttft_target_s, reading_rate=slo.reading_rate),
            endpoints_used=tuple(used),
            migrations=tuple(self._migrations),
            usage=usage,
            late_tokens=sum(1 for x in self._lateness_log if x > LATE_THRESHOLD_NS),
            max_lateness_s=max(self._lateness_log, default=0) / 1e9,
        )

    def outcome(self) -> AnswerOutcome:
        """What the dispatch policy learns from this answer."""
        tokens: dict[str, int] = {}
        for name in self._endpoints:
            c = self._machine.counters(ENDPOINT_IDS[name])
            if c.role != _core.EndpointRole.NONE or c.offered:
                tokens[name] = self._prefilled[name] + c.offered
        return AnswerOutcome(prompt_tokens=self._prompt_tokens, tokens_by_endpoint=tokens, cloud_ttft_s=self._cloud_ttft_s)


def _core_terminal(state: _core.MigrationState) -> bool:
    return state in (_core.MigrationState.FINISHED, _core.MigrationState.FAILED, _core.MigrationState.CANCELLED)


def _describe(decision: DispatchDecision) -> str:
    parts = ["start " + "+".join(decision.start)]
    if decision.fallback is not None:
        parts.append(f"{decision.fallback[0]} after {decision.fallback[1] * 1e3:.0f} ms without a token")
    if decision.handoff is not None:
        parts.append(f"handoff after {decision.handoff.cloud_tokens} cloud tokens at {decision.handoff.interval_s * 1e3:.1f} ms")
    return ", ".join(parts)


__all__ = ["AnswerCoordinator", "AnswerFailed", "AnswerSettings", "ENDPOINT_IDS"]
