"""The public entry point: ``async with pydisco.open_runtime(config) as rt``.

A Runtime owns the endpoints (the device actor, a cloud connection) and the policies, and
starts one AnswerCoordinator per answer::

    async with pydisco.open_runtime(RuntimeConfig(cloud_url=..., cloud_token=...)) as rt:
        async with rt.stream(messages=[{"role": "user", "content": "Hi"}]) as answer:
            async for piece in answer:
                print(piece.text, end="")
        print(answer.report.summary())
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from .._core import TokenRing
from .._errors import ConfigurationError, PydiscoError
from .._groups import single_exception
from .._types import Endpoint, GenerationRequest, Message, Sampling
from ..observability._logging import answer_context, get_logger, new_answer_id
from ..policies import UNPROFILED_DEVICE, create_dispatch_policy, create_migration_policy
from ..policies._base import DeviceSpeed, DispatchPolicy, DispatchView, MigrationPolicy, Slo
from ._config import RuntimeConfig
from ._coordinator import AnswerCoordinator, AnswerSettings
from ._health import Health
from ._migration import MigrationFacts
from ._report import AnswerReport, AnswerStatus, Piece
from ._statistics import RuntimeStatistics, StatisticsRecorder
from ._supervision import Deadlines

__all__ = ["AnswerStream", "Runtime", "RuntimeConfig", "open_runtime"]

ANSWER_HISTORY = 1000  # finished answers' lengths kept for the policies' estimates

log = get_logger("pydisco.runtime")


class AnswerStream:
    """One answer being streamed: iterate it for :class:`Piece`s; ``report`` once it ended."""

    def __init__(self, coordinator: AnswerCoordinator) -> None:
        self._coordinator = coordinator
        self._report: AnswerReport | None = None

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> Piece:
        """The next token as released by the pacer. On cancellation nothing is lost: the token
        stays queued for the next call. Raises AnswerFailed when no endpoint can finish (after
        every committed token was delivered)."""
        piece = await self._coordinator.next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    @property
    def answer_id(self) -> str:
        """The answer's id: its log records', the request id the server sees, its timeline's."""
        return self._coordinator.answer.request.request_id

    @property
    def released_ring(self) -> TokenRing:
        """The native ring the pacer releases this answer into, for a consumer that is not
        this object (a C++ thread with TokenRing::pop_wait, pydisco.NativeCollector): use
        one or the other, never both. The answer's last record is its end record
        (``Token.is_end``, with the finish reason)."""
        return self._coordinator.released_ring

    @property
    def final_count(self) -> int | None:
        """How many tokens the answer has, once it has ended (else None)."""
        return self._coordinator.final_count()

    def status(self) -> AnswerStatus:
        """The answer now: who generates, what is committed, read and unread."""
        return self._coordinator.status()

    @property
    def report(self) -> AnswerReport:
        """The answer's report (complete once iteration ended or the stream block exited)."""
        return self._report if self._report is not None else self._coordinator.report()

    def _seal(self) -> None:
        self._report = self._coordinator.report()


class Runtime:
    """Endpoints plus policies. Create with :func:`open_runtime`."""

    def __init__(
        self,
        config: RuntimeConfig,
        endpoints: Mapping[str, Endpoint],
        dispatch: DispatchPolicy,
        migration: MigrationPolicy,
    ) -> None:
        self._config = config
        self._endpoints = dict(endpoints)
        self._dispatch = dispatch
        self._migration = migration
        self._tokens_spent: collections.Counter[str] = collections.Counter()
        # Worst-case tokens of the answers in flight, per endpoint they were dispatched to.
        self._tokens_in_flight: collections.Counter[str] = collections.Counter()
        self._answer_lengths: collections.deque[int] = collections.deque(maxlen=ANSWER_HISTORY)
        self._health = Health(list(self._endpoints), config.health_backoff, seed=config.seed)
        self._statistics = StatisticsRecorder(config.budget)

    @property
    def endpoints(self) -> Mapping[str, Endpoint]:
        return self._endpoints

    def statistics(self) -> RuntimeStatistics:
        """The answers so far: by outcome and endpoint, handovers, late tokens, QoE, budget."""
        return self._statistics.statistics()

    def _device_speed(self) -> DeviceSpeed | None:
        """The device's measured speed; a device with no profile yet gets the policies'
        ``UNPROFILED_DEVICE``; None without a device."""
        device = self._endpoints.get("device")
        if device is None:
            return None
        profile = getattr(device, "profile", None)
        if profile is None:
            return UNPROFILED_DEVICE
        return DeviceSpeed(profile.prefill_a_s, profile.prefill_c_s_per_token, profile.decode_s_per_token)

    def _cloud_samples(self) -> tuple[Sequence[float], float | None]:
        stats = getattr(self._endpoints.get("cloud"), "statistics", None)
        if stats is None:
            return (), None
        s = stats()
        return s.ttft_samples, s.inter_token_p50

    def _prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt's length as the policies see it: counted by the device (its tokenizer and
        chat template), else by any endpoint that can count, else ~4 characters a token."""
        for name in ("device", "cloud"):
            count = getattr(self._endpoints.get(name), "count_prompt_tokens", None)
            if count is not None:
                return int(count(request))
        text = request.prompt if request.prompt is not None else "\n".join(m["content"] for m in request.messages or ())
        return max(1, len(text) // 4)

    def _device_prefill_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """Prompt tokens the device must compute (its cache holds the rest), if it can say."""
        count = getattr(self._endpoints.get("device"), "tokens_to_prefill", None)
        return prompt_tokens if count is None else min(prompt_tokens, max(0, int(count(request))))

    def _device_answers_ahead(self) -> int:
        """Answers the device runs or has queued now, if it can say (a new one waits for them)."""
        ahead = getattr(self._endpoints.get("device"), "answers_ahead", None)
        return 0 if ahead is None else max(0, int(ahead))

    def _same_vocabulary(self) -> bool:
        device, cloud = self._endpoints.get("device"), self._endpoints.get("cloud")
        if device is None or cloud is None:
            return True
        server_model = cloud.statistics().server_model if hasattr(cloud, "statistics") else None
        return server_model is not None and server_model == getattr(device, "model_id", None)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        max_tokens: int = 128,
        sampling: Sampling = Sampling(),
        stop: tuple[str, ...] = (),
        slo: Slo | None = None,
        pace: bool | None = None,
        request_id: str = "",
    ) -> AsyncIterator[AnswerStream]:
        """Stream one answer. Leaving the block early cancels the answer (endpoints stop within
        a decode step); the report then says "cancelled". Bad arguments raise
        ConfigurationError before anything starts; an exception raised in the block comes out
        as it is.

        ``request_id`` is the answer's id in log records (and the request id the server sees);
        by default a fresh one. The answer's tasks log with it; the block's own code does not."""
        answer_id = request_id or new_answer_id()
        request = GenerationRequest(
            messages=messages, prompt=prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, request_id=answer_id
        )
        config = self._config
        slo = slo or config.slo
        prompt_tokens = self._prompt_tokens(request)
        ttft_samples, tbt = self._cloud_samples()
        device_speed = self._device_speed()
        usable = self._health.usable(list(self._endpoints))  # an endpoint that is down sits out
        for name in set(self._endpoints) - set(usable):
            log.info("%s is down after recent failures: left out of dispatch", name, extra={"answer_id": answer_id})
        view = DispatchView(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            slo=slo,
            budget=config.budget,
            device=device_speed if "device" in usable else None,
            cloud_available="cloud" in usable,
            server_ttft_samples_s=ttft_samples,
            server_tbt_s=tbt,
            tokens_spent=dict(self._tokens_spent),
            device_cached_tokens=prompt_tokens - self._device_prefill_tokens(request, prompt_tokens),
            device_answers_ahead=self._device_answers_ahead(),
            tokens_in_flight=+self._tokens_in_flight,
        )
        decision = self._dispatch.decide(view)
        reserved = collections.Counter(dict.fromkeys(decision.endpoints_used(), prompt_tokens + max_tokens))
        coordinator = AnswerCoordinator(
            request,
            endpoints=self._endpoints,
            decision=decision,
            migration=self._migration,
            settings=AnswerSettings(
                slo=slo,
                pace=config.pace if pace is None else pace,
                virtual_time=config.virtual_time,
                realtime_pacer=config.realtime_pacer,
                deadlines=Deadlines(first_token_s=config.first_token_timeout_s, silence_s=config.silence_timeout_s),
                cost_per_token=config.cost_per_token,
                prefill_cost_per_token=config.prefill_cost_per_token,
                same_vocabulary=self._same_vocabulary,
                device_standby=config.device_standby,
                pacer_spin_s=config.pacer_spin_s,
                reader_handoff_s=config.reader_handoff_s,
            ),
            facts=MigrationFacts(
                prompt_tokens=prompt_tokens,
                reading_rate=slo.reading_rate,
                answer_lengths=tuple(self._answer_lengths),
                device=device_speed,
                server_ttft_samples_s=ttft_samples,
                cost_per_token=config.cost_per_token,
                prefill_cost_per_token=config.prefill_cost_per_token,
                max_migrations=config.max_migrations,
            ),
            health=self._health,
        )
        answer = AnswerStream(coordinator)
        self._tokens_in_flight.update(reserved)
        try:
            async with trio.open_nursery() as nursery:
                with answer_context(answer_id):  # the answer's tasks inherit it; the block does not
                    await nursery.start(coordinator.run)
                try:
                    yield answer
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise single_exception(group) from None
        finally:
            coordinator.close()
            answer._seal()
            outcome = coordinator.outcome()
            self._tokens_in_flight.subtract(reserved)
            self._tokens_spent.update(outcome.tokens_by_endpoint)
            self._answer_lengths.append(answer.report.tokens)
            self._dispatch.observe(outcome)
            self._statistics.record(answer.report, outcome)
            _log_end(answer_id, answer.report)


def _log_end(answer_id: str, report: AnswerReport) -> None:
    ttft = f"{report.ttft_s * 1e3:.0f} ms" if report.ttft_s is not None else "-"
    log.log(
        logging.WARNING if report.finish_reason == "failed" else logging.INFO,
        "answer ended (%s): %d tokens, TTFT %s, QoE %.3f, endpoints %s, %d handovers",
        report.finish_reason, report.tokens, ttft, report.qoe, "+".join(report.endpoints_used) or "-",
        len(report.migrations), extra={"answer_id": answer_id},
    )  # fmt: skip


@contextlib.asynccontextmanager
async def _open_device(config: RuntimeConfig) -> AsyncIterator[Endpoint]:
    """The device endpoint the config names: one answer at a time, or batched."""
    from ..device._batched_endpoint import DEFAULT_CONTEXT as BATCHED_CONTEXT
    from ..device._endpoint import DEFAULT_CONTEXT as SOLO_CONTEXT
    from ..device import open_batched_device_endpoint, open_device_endpoint

    path = None if config.device_model == "default" else config.device_model
    if config.device_max_batch > 1:
        async with open_batched_device_endpoint(
            path, scheduler=config.device_scheduler, max_batch=config.device_max_batch,
            n_threads=config.device_threads, profile=True, n_ctx=config.device_context or BATCHED_CONTEXT,
        ) as batched:  # fmt: skip
            yield batched
        return
    async with open_device_endpoint(path, n_threads=config.device_threads, n_ctx=config.device_context or SOLO_CONTEXT) as device:
        # A profile helps the policies; an unreadable cache or a failed measurement is not
        # fatal (they then assume UNPROFILED_DEVICE).
        with contextlib.suppress(OSError, ValueError, PydiscoError):
            await device.load_profile()
        yield device


@contextlib.asynccontextmanager
async def open_runtime(
    config: RuntimeConfig = RuntimeConfig(), *, endpoints: Mapping[str, Endpoint] | None = None
) -> AsyncIterator[Runtime]:
    """Load the device model (if any), prepare the cloud endpoint (if any; it connects on first
    use), and yield a :class:`Runtime`. Everything is closed on exit.

    ``endpoints`` replaces the ones the config describes (keys "device" and/or "cloud"): your
    own Endpoint implementations, or pydisco.testing.ScriptedEndpoint for simulations.

    Errors: a bad config (an unknown policy, bad options) raises ConfigurationError before
    anything is loaded; a missing model ModelError; a malformed cloud URL ConfigurationError.
    An exception raised inside the block comes out unchanged, whatever closing the endpoints
    does; never an ExceptionGroup.
    """
    dispatch = create_dispatch_policy(config.dispatch, **dict(config.dispatch_options))
    migration = create_migration_policy(config.migration, **dict(config.migration_options))
    if endpoints is not None:
        if not endpoints or set(endpoints) - {"device", "cloud"}:
            raise ConfigurationError('endpoints= takes "device" and/or "cloud"')
    elif config.device_model is None and config.cloud_url is None:
        raise ConfigurationError("a runtime needs a device model, a cloud URL, or both")
    async with contextlib.AsyncExitStack() as stack:
        built: dict[str, Endpoint] = dict(endpoints) if endpoints is not None else {}
        if endpoints is None and config.device_model is not None:
            built["device"] = await stack.enter_async_context(_open_device(config))
        if endpoints is None and config.cloud_url is not None:
            from ..cloud import open_cloud_endpoint

            built["cloud"] = await stack.enter_async_context(
                open_cloud_endpoint(config.cloud_url, token=config.cloud_token, ssl_context=config.cloud_ssl)
            )
        yield Runtime(config, built, dispatch, migration)
