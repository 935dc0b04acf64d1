"""Moving an answer to another endpoint, and what happens when an endpoint fails.

A **handover** has one procedure whatever asked for it — DiSCo's migration policy, P/D-Device's
plan, or a failure of the source while a target was already preparing:

1. ``prepare(target)`` in the machine; the target prefills the committed prefix (``prepare``),
   while the source keeps committing;
2. when the target is ready (and a P/D plan's condition holds), ``target_ready`` stops the source
   at the committed position, and the target resumes from exactly there;
3. the target's first commit (``taken_over``, in the machine) completes it.
If the source fails during 1, the machine goes straight to handing over and the target continues
from the committed prefix once its prefill is done.

A **failover** is what the machine says after a failure: with no endpoint left committing
(``recovering``) another endpoint that has not failed resumes from the committed prefix; with
none, the answer fails — after every committed token was delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from .._errors import ConfigurationError, EndpointError, PydiscoError
from .._types import Endpoint
from ..observability._logging import get_logger
from ._answer import Answer, Role, State
from ._health import Health
from ._supervision import Runs, Usage

log = get_logger("pydisco.runtime")


class AnswerFailed(PydiscoError):
    """No endpoint could finish the answer. The tokens already delivered stay valid."""


ReadyCondition = Callable[[], bool]


class Handover:
    def __init__(
        self,
        answer: Answer,
        endpoints: Mapping[str, Endpoint],
        runs: Runs,
        usage: Usage,
        by_token_ids: Callable[[], bool],
        nursery: trio.Nursery,
        health: Health,
    ) -> None:
        self._answer = answer
        self._endpoints = endpoints
        self._runs = runs
        self._usage = usage
        self._by_token_ids = by_token_ids
        self._nursery = nursery
        self._health = health
        self.error: Exception | None = None  # why the answer failed, once it has
        self._failures: list[tuple[str, BaseException]] = []

    # -- handover -----------------------------------------------------------------------

    def begin(self, target: str, *, ready_when: ReadyCondition | None = None, on_taken_over: Callable[[], None] | None = None) -> None:
        """Hand the answer to ``target``. ``ready_when``: a further condition (P/D-Device's
        "the cloud has sent its K tokens") before the source stops. ``on_taken_over``: called
        once the target has committed its first token."""
        self._answer.prepare(target)
        self._nursery.start_soon(self._hand_over, target, ready_when, on_taken_over, name=f"pydisco handover to {target}")

    async def _hand_over(self, target: str, ready_when: ReadyCondition | None, on_taken_over: Callable[[], None] | None) -> None:
        answer = self._answer
        prepare = getattr(self._endpoints[target], "prepare", None)
        if prepare is not None:
            try:
                computed = await prepare(answer.request_at(answer.committed, by_token_ids=self._by_token_ids()))
            except Exception as e:  # the target cannot take over: the source goes on
                log.info("%s could not prepare (%s): the source goes on", target, e)
                self.endpoint_failed(target, e)
                return
            self._usage.add_prefill(target, computed)
        await answer.wait_until(lambda: answer.state != State.PREPARING or ready_when is None or ready_when())
        if answer.state == State.PREPARING:
            source = answer.source
            position: int = answer.target_ready()
            log.info("handover %s -> %s at position %d", source, target, position)
            if source is not None:
                self._runs.stop(source)
            self._runs.launch(target, position)
        elif answer.state == State.HANDING_OVER and answer.target == target:
            position = answer.committed  # the source failed while we prepared
            log.warning("failover to %s, prepared while the source failed, at position %d", target, position)
            self._runs.launch(target, position)
        else:
            return  # the answer ended, or the target failed meanwhile
        await self._taken_over(target, position, on_taken_over)

    async def _taken_over(self, target: str, position: int, then: Callable[[], None] | None = None) -> None:
        """Wait for ``target``'s first commit (the handover's end); say so, then ``then()``."""
        answer = self._answer
        handed_ns = answer.clock.now_ns()
        await answer.wait_until(lambda: answer.state != State.HANDING_OVER)
        if answer.source == target:
            gap_ms = (answer.clock.now_ns() - handed_ns) / 1e6
            log.info("%s took over at position %d, %.1f ms after the handover", target, position, gap_ms)
            if then is not None:
                then()

    # -- failover -----------------------------------------------------------------------

    def endpoint_failed(self, name: str, error: BaseException) -> None:
        """``name`` failed (raised, went silent, or could not prepare): tell the machine, then
        continue the answer elsewhere if it has no committer left."""
        answer = self._answer
        if answer.ended:
            return
        self._runs.stop(name)
        if answer.role(name) == Role.NONE:
            return  # never started on this answer (a failed standby prefill, say)
        self._failures.append((name, error))
        if not _refused(error):
            self._health[name].failed()  # left out of dispatch for a while
        answer.endpoint_failed(name)
        if answer.state == State.RECOVERING:
            self._resume_elsewhere(name, error)

    def _resume_elsewhere(self, failed: str, error: BaseException) -> None:
        answer = self._answer
        candidates = [name for name in self._endpoints if not answer.has_failed(name)]
        if candidates:
            name = self._health.usable(candidates)[0]  # a healthy one if there is one
            # A racer that lost a moment ago may not have been stopped yet: its run restarts
            # from the committed prefix.
            self._runs.stop(name)
            position = answer.resume(name)
            log.warning("failover %s -> %s at position %d: %s", failed, name, position, error)
            self._runs.launch(name, position)
            self._nursery.start_soon(self._taken_over, name, position, name=f"pydisco failover to {name}")
            return
        self.error = self._why_failed(failed, error)
        log.warning("the answer failed after %d tokens: %s", answer.committed, self.error)
        answer.give_up()

    def _why_failed(self, failed: str, error: BaseException) -> Exception:
        """The error the reader gets. When every endpoint refused the request itself before a
        token (a prompt longer than every context, a request none can run), that refusal is the
        story: a ConfigurationError, as if the request had been checked up front."""
        if self._answer.committed == 0 and all(_refused(e) for _, e in self._failures):
            for _, e in self._failures:
                if isinstance(e, ConfigurationError):
                    return e
            return ConfigurationError("; ".join(f"{name}: {e}" for name, e in self._failures))
        failure = AnswerFailed(f"no endpoint can continue the answer after {failed} failed: {error}")
        failure.__cause__ = error
        return failure


_REFUSAL_CODES = frozenset({"prompt_too_long", "bad_request"})


def _refused(error: BaseException) -> bool:
    """Did the endpoint refuse the request itself (rather than fail while serving it)?"""
    if isinstance(error, ConfigurationError):
        return True
    return isinstance(error, EndpointError) and error.code in _REFUSAL_CODES
