"""Endpoint runs: each endpoint working on the answer, in its own cancel scope, with deadlines.

A run calls ``endpoint.generate`` and offers every token it gets to the machine. Its deadlines
are Trio cancel-scope deadlines, moved on at each token: ``first_token_timeout_s`` from the run's
start — for an endpoint that queues requests, from when it says the request left its queue
(``sink.admitted()``) — then ``silence_timeout_s`` after each token; when the endpoint says its
server paused the answer for others (``sink.paused()``), not before the reader's unread buffer
would have run out plus ``silence_timeout_s``. A run that misses one, or whose endpoint raises
anything but a cancellation, has failed: the failure goes to the coordinator's handler, which
decides what happens next (``_handover.Failover``). A run stopped by the coordinator (lost race,
handover) just ends.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Mapping

import trio

from .._errors import EndpointError, PydiscoError
from .._types import Endpoint, GenerationResult, ReaderState, TokenPiece
from ..observability._logging import get_logger
from ..policies._base import Slo
from ._answer import Answer
from ._health import Health

log = get_logger("pydisco.runtime")

FailureHandler = Callable[[str, BaseException], None]


@dataclasses.dataclass(frozen=True)
class Deadlines:
    first_token_s: float  # from the run's start to its first token
    silence_s: float  # between two tokens


@dataclasses.dataclass
class _Run:
    name: str
    position: int  # where it (re)started
    stop_scope: trio.CancelScope
    started: float  # Trio time
    first_token_s: float | None = None  # seconds from start to its first offer
    offered: int = 0
    next_position: int = 0  # after the last token it reported: where its answer ends
    prefilled: int | None = None  # what the endpoint said its prefill computed, if it did


class _RunSink:
    """A run's sink: each token to the machine, the endpoint's word that it started, what its
    prefill computed and that its server paused the answer, and the reader's state for an
    endpoint that tells its server (``_types.TokenSink``)."""

    __slots__ = ("_offer", "_answer", "admitted", "prefilled", "paused", "slo")

    def __init__(self, offer: Callable[[TokenPiece], None], admitted: Callable[[], None], prefilled: Callable[[int], None],
                 paused: Callable[[], None], answer: Answer, slo: Slo | None) -> None:  # fmt: skip
        self._offer = offer
        self._answer = answer
        self.slo = slo  # the answer's, for an endpoint that schedules by it (a step loop)
        self.admitted = admitted
        self.prefilled = prefilled
        self.paused = paused

    def __call__(self, piece: TokenPiece) -> None:
        self._offer(piece)

    def reader_state(self) -> ReaderState:
        answer = self._answer
        interval_ns = answer.pacer.interval_ns
        return ReaderState(answer.committed - answer.consumed(), 1e9 / interval_ns if interval_ns > 0 else None)


class Usage:
    """What each endpoint computed for this answer beyond the tokens it offered: the prompt and
    prefix tokens it prefilled (its generate results, its prepares, and for runs that ended
    without a result — failed or stopped — what the endpoint said it prefilled, else what they
    were asked to prefill; see ``Runs._account``)."""

    def __init__(self) -> None:
        self.prefilled: collections.Counter[str] = collections.Counter()

    def add_prefill(self, name: str, tokens: int) -> None:
        self.prefilled[name] += tokens


class Runs:
    """The endpoint runs of one answer."""

    def __init__(
        self,
        answer: Answer,
        endpoints: Mapping[str, Endpoint],
        deadlines: Deadlines,
        usage: Usage,
        prompt_tokens: int,
        by_token_ids: Callable[[], bool],
        nursery: trio.Nursery,
        on_failure: FailureHandler,
        on_commit: Callable[[], None],
        health: Health,
        slo: Slo | None = None,
    ) -> None:
        self._answer = answer
        self._slo = slo
        self._endpoints = endpoints
        self._deadlines = deadlines
        self._usage = usage
        self._prompt_tokens = prompt_tokens
        self._by_token_ids = by_token_ids
        self._nursery = nursery
        self._on_failure = on_failure
        self._on_commit = on_commit
        self._health = health
        self._runs: dict[str, _Run] = {}
        self.cloud_ttft_s: float | None = None  # the cloud's TTFT on a fresh start (DiSCo's F_s)

    def is_running(self, name: str) -> bool:
        """``name`` has a run that was not stopped."""
        run = self._runs.get(name)
        return run is not None and not run.stop_scope.cancel_called

    def launch(self, name: str, position: int) -> None:
        """Start ``name`` generating from ``position`` (the committed prefix)."""
        previous = self._runs.get(name)
        if previous is not None and not previous.stop_scope.cancel_called:
            raise RuntimeError(f"{name} is already running on this answer")
        # A stopped run may still be winding down: the new one replaces it (the endpoint
        # serialises the two itself).
        run = _Run(name, position, trio.CancelScope(), trio.current_time(), next_position=position)
        self._runs[name] = run
        log.info("%s starts at position %d", name, position)
        self._nursery.start_soon(self._run, run, name=f"pydisco {name} run")

    def stop(self, name: str) -> None:
        """Stop ``name`` (it stops within a decode step; its later offers are dropped anyway)."""
        run = self._runs.get(name)
        if run is not None and not run.stop_scope.cancel_called:
            log.debug("%s stopped after %d tokens", name, run.offered)
            run.stop_scope.cancel()

    def stop_all(self) -> None:
        for run in self._runs.values():
            run.stop_scope.cancel()

    async def _run(self, run: _Run) -> None:
        answer, deadlines = self._answer, self._deadlines
        endpoint = self._endpoints[run.name]
        request = answer.request_at(run.position, by_token_ids=self._by_token_ids())
        watch = trio.CancelScope(deadline=run.started + deadlines.first_token_s)

        def offer(piece: TokenPiece) -> None:
            now = trio.current_time()
            if run.offered == 0:
                run.first_token_s = now - run.started
                log.debug("%s: first token after %.1f ms", run.name, run.first_token_s * 1e3)
                self._health[run.name].succeeded()
                if run.name == "cloud" and run.position == 0:
                    self.cloud_ttft_s = run.first_token_s
            run.offered += 1
            run.next_position = piece.position + 1
            watch.deadline = now + deadlines.silence_s
            if answer.offer(run.name, piece):
                self._on_commit()

        def admitted() -> None:
            # Waiting for the endpoint is not silence: the first-token deadline starts now.
            run.started = trio.current_time()
            log.debug("%s admitted the request", run.name)
            if run.offered == 0:
                watch.deadline = run.started + deadlines.first_token_s

        def prefilled(tokens: int) -> None:
            if tokens < 0:
                raise ValueError(f"{run.name} reported a negative prefill: {tokens}")
            run.prefilled = tokens

        def paused() -> None:
            # The endpoint's server paused the answer for others (a step scheduler's
            # preemption): not silence while the reader still has tokens to read.
            state = sink.reader_state()
            rate = state.reading_rate_tps
            slack = state.buffered_tokens / rate if rate else 0.0
            log.debug("%s paused the answer; %.2f s of reading left", run.name, slack)
            watch.deadline = max(watch.deadline, trio.current_time() + slack + deadlines.silence_s)

        sink = _RunSink(offer, admitted, prefilled, paused, answer, self._slo)
        if getattr(endpoint, "queues_requests", False):
            watch.deadline = math.inf  # until it says the request started

        result: GenerationResult | None = None
        failure: BaseException | None = None
        timed_out = False
        try:
            with run.stop_scope, watch:
                try:
                    result = await endpoint.generate(request, sink)
                except trio.Cancelled:
                    raise
                except Exception as e:  # any endpoint failure, a bug in a custom one included
                    failure = e
            if watch.cancelled_caught and not run.stop_scope.cancel_called:
                timed_out = True
                limit = deadlines.silence_s if run.offered else deadlines.first_token_s
                failure = EndpointError(f"{run.name} silent for {limit:.2f} s", code="timeout")
        finally:
            if self._runs.get(run.name) is run:
                del self._runs[run.name]
            self._account(run, result, timed_out=timed_out)
        if run.stop_scope.cancel_called:
            return  # stopped by the coordinator: whatever it did since does not count
        if failure is None and result is not None and result.finish_reason not in ("stop", "length"):
            failure = EndpointError(f"{run.name} ended its answer as {result.finish_reason!r}")
        if failure is not None:
            if isinstance(failure, PydiscoError):  # an endpoint's own report of its failure
                log.info("%s failed: %s", run.name, failure)
            else:
                log.error("%s failed with an unexpected error", run.name, exc_info=failure)
            self._on_failure(run.name, failure)
        elif result is not None:
            # Where its reported tokens end, not start + generated_tokens: a stop string can cut
            # sampled tokens that were never reported.
            answer.finish(run.name, run.next_position, result.finish_reason)

    def _account(self, run: _Run, result: GenerationResult | None, *, timed_out: bool) -> None:
        """Charge the run's prefill. Without a result (it failed or was stopped): what the
        endpoint said it prefilled; else, if it produced a token, was stopped or timed out
        (it was computing), what it was asked to prefill. An endpoint that raised
        before its first token and said nothing computed nothing (a refused connection)."""
        if result is not None:
            self._usage.add_prefill(run.name, result.prefilled_tokens)
        elif run.prefilled is not None:
            self._usage.add_prefill(run.name, run.prefilled)
        elif run.offered or run.stop_scope.cancel_called or timed_out:
            self._usage.add_prefill(run.name, self._prompt_tokens + run.position)
