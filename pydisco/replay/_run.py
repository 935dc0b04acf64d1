"""Replay a workload through the shipped runtime in virtual time.

``replay(requests, config)`` opens a real ``pydisco.Runtime`` (``virtual_time=True``) on the
simulated endpoints of ``_endpoints.py`` and, under ``trio.testing.MockClock``, starts each
request of the (streamed) workload at its arrival time and reads its answer as an application
would. The dispatch policy, the coordinator, the migration machine, the pacer and the server's
step scheduler are the shipped ones. Each answer gives one :class:`RequestRow`; the
:class:`ReplaySummary` aggregates them in bounded memory.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import trio
import trio.testing

from .._errors import ConfigurationError, PydiscoError
from .._groups import single_exception
from ..policies import create_dispatch_policy, step_scheduler_names
from ..policies._base import Budget, EndpointName, Slo
from ..runtime import AnswerFailed, RuntimeConfig, open_runtime
from ..workloads import TraceRequest
from ._endpoints import SharedDevice, SimulatedCloud, SimulatedDevice, TraceBook, TraceFacts
from ._models import DeviceModel, LastHop, ServerModel
from ._real_models import SerialDevice
from ._stats import Histogram

__all__ = ["OUTCOMES", "ReplayConfig", "ReplaySummary", "RequestRow", "replay"]

Outcome = Literal["completed", "failed", "refused", "empty"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "refused", "empty")
QOE_GOOD = 0.95  # Andes' "good QoE" threshold


def default_budget_endpoint(dispatch: str) -> EndpointName:
    """Which endpoint ``--budget`` constrains when not said: DiSCo-D is the device-budget
    policy, everything else budgets the cloud (DiSCo-S's server budget)."""
    return "device" if dispatch == "disco-d" else "cloud"


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """What to replay against. ``device`` / ``server``: the endpoint models (None leaves that
    endpoint out). ``device_mode``: ``"fleet"`` (each request its own device, as a trace of
    many users), ``"serial"`` (one single-sequence device, calls in turn: the real endpoint's
    shape, ``pydisco.replay._real_models``) or ``"shared"`` (one device runs them all, batched, at most
    ``device_max_batch`` at once under the step scheduler ``device_scheduler``). ``budget``: the share of
    tokens ``budget_on`` may process (default per dispatch policy: :func:`default_budget_endpoint`).
    ``slo``: for requests whose trace gives none. ``pace``: release at the reading rate
    (Andes' pacer), as the runtime does by default. ``seed`` fixes everything random: the
    server's overhead draws, the link, the health jitter and Trio's scheduling order."""

    dispatch: str = "disco-d"
    migration: str = "disco-migrate"
    budget: float = 1.0
    budget_on: EndpointName | None = None
    seed: int = 0
    device: DeviceModel | None = None
    device_mode: Literal["fleet", "shared", "serial"] = "fleet"
    device_max_batch: int = 4
    device_scheduler: str = "fcfs"
    server: ServerModel | None = None
    link: LastHop | None = None
    slo: Slo = Slo()
    pace: bool = True
    device_standby: bool = True
    max_migrations: int = 1
    first_token_timeout_s: float = 10.0
    silence_timeout_s: float = 2.0
    cost_per_token: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"device": 0.2, "cloud": 1.0})
    prefill_cost_per_token: Mapping[str, float] = dataclasses.field(default_factory=dict)  # RuntimeConfig's
    dispatch_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # False: the cloud does not tell the runtime when its server admits a request, as the real
    # cloud client cannot (the protocol has no such frame): time in the server's queue then
    # counts against the first-token deadline (SimulatedCloud's announces_admission).
    cloud_announces_admission: bool = True

    def __post_init__(self) -> None:
        if self.device is None and self.server is None:
            raise ConfigurationError("a replay needs a device model, a server model, or both")
        if not 0.0 <= self.budget <= 1.0:
            raise ConfigurationError(f"the budget is a share in [0, 1], got {self.budget!r}")
        if self.device_mode not in ("fleet", "shared", "serial"):
            raise ConfigurationError(f"device_mode is 'fleet', 'shared' or 'serial', not {self.device_mode!r}")
        if self.device_scheduler not in step_scheduler_names():
            known = ", ".join(step_scheduler_names())
            raise ConfigurationError(f"unknown step scheduler {self.device_scheduler!r}; known: {known}")

    def runtime_config(self) -> RuntimeConfig:
        options = dict(self.dispatch_options)
        policy = create_dispatch_policy(self.dispatch)  # checks the name before anything runs
        # DiSCo's F_s starts from the measured server TTFTs when the policy takes a prior.
        if self.server is not None and "server_ttft_prior" in inspect.signature(type(policy)).parameters \
                and "server_ttft_prior" not in options:
            options["server_ttft_prior"] = self.server_ttft_prior()
        return RuntimeConfig(
            device_model=None, virtual_time=True, dispatch=self.dispatch, dispatch_options=options,
            migration=self.migration, budget=Budget(self.budget_on or default_budget_endpoint(self.dispatch), self.budget),
            slo=self.slo, pace=self.pace, seed=self.seed, device_standby=self.device_standby,
            max_migrations=self.max_migrations, first_token_timeout_s=self.first_token_timeout_s,
            silence_timeout_s=self.silence_timeout_s, cost_per_token=dict(self.cost_per_token),
            prefill_cost_per_token=dict(self.prefill_cost_per_token),
        )  # fmt: skip

    def server_ttft_prior(self) -> tuple[float, ...]:
        """The server's unloaded TTFT as the policies' prior: overhead + the model's own step."""
        if self.server is None:
            return ()
        own = self.server.step.decode(1)
        return tuple(s + own for s in self.server.overhead_samples_s)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRow:
    """One request of the replay (times in seconds; NaN where it does not apply)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    outcome: Outcome
    finish_reason: str
    tokens: int  # tokens the reader received
    ttft_s: float
    tbt_p50_s: float
    tbt_mean_s: float  # the answer's mean time per output token as the reader got it
    tbt_max_s: float
    qoe: float
    ttft_target_s: float
    tpot_target_s: float  # 1 / the SLO's reading rate
    realtime: bool  # the SLO's real-time class (SLICE)
    endpoints: str  # those that committed tokens, in order, joined by "+"
    migrations: int
    failovers: int
    device_refused: bool  # the device could not take it (context): routed elsewhere or refused
    cloud_tokens: int  # prompt + answer tokens the cloud processed
    cloud_decoded_tokens: int  # answer tokens the cloud produced (committed or not)
    device_tokens: int
    cost: float
    device_energy_j: float
    error: str

    @staticmethod
    def columns() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(RequestRow))

    def values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.columns())


@dataclasses.dataclass
class ReplaySummary:
    """What a replay did, aggregated as rows arrive (bounded memory)."""

    config: dict[str, object]
    requests: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=lambda: {o: 0 for o in OUTCOMES})
    routed_from_device: int = 0  # the device refused (context) and another endpoint served it
    migrations: int = 0
    failovers: int = 0
    ttft: Histogram = dataclasses.field(default_factory=Histogram)
    tbt: Histogram = dataclasses.field(default_factory=Histogram)
    qoe: Histogram = dataclasses.field(default_factory=lambda: Histogram(floor=1e-4))
    qoe_good: int = 0
    ttft_met: int = 0
    cost: float = 0.0
    tokens_by_endpoint: dict[str, int] = dataclasses.field(default_factory=lambda: {"device": 0, "cloud": 0})
    device_energy_j: float = 0.0
    virtual_s: float = 0.0
    wall_s: float = 0.0

    def add(self, row: RequestRow, tbt: Iterable[float]) -> None:
        self.requests += 1
        self.outcomes[row.outcome] += 1
        if row.device_refused and row.outcome == "completed":
            self.routed_from_device += 1
        self.migrations += row.migrations
        self.failovers += row.failovers
        if not math.isnan(row.ttft_s):
            self.ttft.add(row.ttft_s)
            self.ttft_met += row.ttft_s <= row.ttft_target_s
        self.tbt.extend(tbt)
        if row.outcome in ("completed", "failed"):
            self.qoe.add(row.qoe)
            self.qoe_good += row.qoe >= QOE_GOOD
        self.cost += row.cost
        self.tokens_by_endpoint["cloud"] += row.cloud_tokens
        self.tokens_by_endpoint["device"] += row.device_tokens
        self.device_energy_j += row.device_energy_j

    def budget_share(self, endpoint: str) -> float:
        total = sum(self.tokens_by_endpoint.values())
        return self.tokens_by_endpoint.get(endpoint, 0) / total if total else math.nan

    def to_json(self) -> dict[str, object]:
        """The summary as plain JSON values (what ``pydisco replay --json`` prints)."""
        served = self.outcomes["completed"] + self.outcomes["failed"]
        budget_on = str(self.config.get("budget_on", "cloud"))
        out: dict[str, object] = finite_json({
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "routed_from_device": self.routed_from_device,
            "migrations": self.migrations,
            "failovers": self.failovers,
            "ttft_s": self.ttft.summary(),
            "tbt_s": self.tbt.summary(),
            "qoe": {**self.qoe.summary((0.01, 0.1, 0.5)), "share_at_least_0.95": self.qoe_good / served if served else math.nan},
            "ttft_slo_attainment": self.ttft_met / self.ttft.count if self.ttft.count else math.nan,
            "cost": self.cost,
            "tokens_by_endpoint": dict(self.tokens_by_endpoint),
            "budget": {"on": budget_on, "share_asked": self.config.get("budget"), "share_used": self.budget_share(budget_on)},
            "device_energy_j": self.device_energy_j,
            "virtual_s": self.virtual_s,
            "wall_s": self.wall_s,
            "config": self.config,
        })
        return out


def finite_json(value: Any) -> Any:
    """NaN and infinities as None: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


RowSink = Callable[[RequestRow], None]
Progress = Callable[[int, float], None]  # (requests finished, virtual seconds)


def replay(
    requests: Iterable[TraceRequest],
    config: ReplayConfig,
    *,
    on_row: RowSink | None = None,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Replay ``requests`` (any iterable, consumed as it goes: a generator streams) under
    ``config`` in virtual time; ``on_row`` gets each request's row as it ends. Deterministic for
    ``config.seed``. Blocks until the last answer ends; returns the summary."""
    summary = ReplaySummary(config=describe(config))
    _seed_trio_scheduler(config.seed)
    started = time.perf_counter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    try:
        trio.run(_replay, requests, config, summary, on_row, progress, clock=clock)
    except BaseExceptionGroup as group:
        raise single_exception(group) from None
    summary.wall_s = time.perf_counter() - started
    return summary


def describe(config: ReplayConfig) -> dict[str, object]:
    return {
        "dispatch": config.dispatch, "migration": config.migration, "budget": config.budget,
        "budget_on": config.budget_on or default_budget_endpoint(config.dispatch), "seed": config.seed,
        "device": None if config.device is None else {"mode": config.device_mode, "source": config.device.source,
                                                      **({"scheduler": config.device_scheduler, "max_batch": config.device_max_batch}
                                                         if config.device_mode == "shared" else {}),
                                                      "prefill_a_s": config.device.prefill_a_s,
                                                      "prefill_c_s_per_token": config.device.prefill_c_s_per_token,
                                                      "decode_s_per_token": config.device.decode_s_per_token,
                                                      "context_tokens": config.device.context_tokens},
        "server": None if config.server is None else {"source": config.server.source, "scheduler": config.server.scheduler,
                                                      "max_batch": config.server.max_batch,
                                                      "decode_s_batch1": config.server.step.decode(1)},
        "link": "none" if config.link is None or config.link.is_ideal else "emulated",
        "pace": config.pace,
    }  # fmt: skip


def _seed_trio_scheduler(seed: int) -> None:
    """Trio picks the order of tasks that become runnable together at random (on purpose, to
    shake out races). A replay must be reproducible: seed that choice. (A private attribute of
    Trio; if it moves, replays stay correct but may differ in tie orders between runs.)"""
    from trio._core import _run

    rng = getattr(_run, "_r", None)
    if rng is not None:
        rng.seed(seed)


async def _replay(
    requests: Iterable[TraceRequest], config: ReplayConfig, summary: ReplaySummary,
    on_row: RowSink | None, progress: Progress | None,
) -> None:
    book = TraceBook()
    endpoints: dict[str, Any] = {}
    device: SimulatedDevice | SharedDevice | None = None
    cloud: SimulatedCloud | None = None
    if config.device is not None:
        if config.device_mode == "shared":
            device = SharedDevice(config.device, book, max_batch=config.device_max_batch, scheduler=config.device_scheduler)
        elif config.device_mode == "serial":
            device = SerialDevice(config.device, book)
        else:
            device = SimulatedDevice(config.device, book)
        endpoints["device"] = device
    if config.server is not None:
        cloud = SimulatedCloud(config.server, book, link=config.link, seed=config.seed,
                               announces_admission=config.cloud_announces_admission)
        endpoints["cloud"] = cloud
    runtime_config = config.runtime_config()
    async with trio.open_nursery() as servers:
        if cloud is not None:
            servers.start_soon(cloud.run, name="replay server")
        if isinstance(device, SharedDevice):
            servers.start_soon(device.run, name="replay shared device")
        async with open_runtime(runtime_config, endpoints=endpoints) as rt:
            done = 0

            async def one(index: int, request: TraceRequest) -> None:
                nonlocal done
                row, tbt = await _answer(rt, index, request, config, book, device, cloud)
                summary.add(row, tbt)
                if on_row is not None:
                    on_row(row)
                done += 1
                if progress is not None:
                    progress(done, trio.current_time())

            async with trio.open_nursery() as answers:
                for index, request in enumerate(requests):
                    await trio.sleep_until(max(request.arrival_s, trio.current_time()))
                    answers.start_soon(one, index, request)
        summary.virtual_s = trio.current_time()
        servers.cancel_scope.cancel()


async def _answer(
    rt: Any, index: int, request: TraceRequest, config: ReplayConfig, book: TraceBook,
    device: SimulatedDevice | SharedDevice | None, cloud: SimulatedCloud | None,
) -> tuple[RequestRow, tuple[float, ...]]:
    slo = request.slo or config.slo
    rid = str(index)
    if request.output_tokens == 0:
        return request_row(index, request, slo, None, None)
    book.add(rid, TraceFacts(request.prompt_tokens, request.output_tokens, slo))
    try:
        report, failure = await read_answer(rt, prompt="", request=request, slo=slo, request_id=rid)
    finally:
        refused_by_device = device is not None and rid in device.refused
        device_work = device.forget(rid) if device is not None else (0, 0)
        if cloud is not None:
            cloud.forget(rid)
        book.remove(rid)
    energy = config.device.energy_j(*device_work) if config.device is not None else 0.0
    return request_row(index, request, slo, report, failure, device_energy_j=energy, device_refused=refused_by_device)


async def read_answer(rt: Any, *, prompt: str, request: TraceRequest, slo: Slo, request_id: str) -> tuple[Any, BaseException | None]:
    """Read one answer of ``rt`` to its end as an application would: its report (None when the
    runtime refused the request) and what failed, if anything did."""
    failure: BaseException | None = None
    report = None
    try:
        async with rt.stream(prompt=prompt, max_tokens=request.output_tokens, slo=slo, request_id=request_id) as answer:
            try:
                async for _ in answer:
                    pass
            except AnswerFailed as e:
                failure = e
        report = answer.report
    except (ConfigurationError, PydiscoError) as e:
        failure = e
    return report, failure


def request_row(
    index: int, request: TraceRequest, slo: Slo, report: Any, failure: BaseException | None, *,
    device_energy_j: float = 0.0, device_refused: bool = False,
) -> tuple[RequestRow, tuple[float, ...]]:
    """A request's row, and the gaps between its tokens, from its answer's report (None: the
    request was refused, or is empty: nothing to answer)."""
    nan = math.nan
    fields: dict[str, Any] = dict(
        index=index, arrival_s=request.arrival_s, prompt_tokens=request.prompt_tokens,
        output_tokens=request.output_tokens, outcome="refused", finish_reason="refused", tokens=0,
        ttft_s=nan, tbt_p50_s=nan, tbt_mean_s=nan, tbt_max_s=nan, qoe=nan, ttft_target_s=slo.ttft_target_s,
        tpot_target_s=slo.tpot_s, realtime=slo.realtime, endpoints="", migrations=0, failovers=0,
        device_refused=device_refused, cloud_tokens=0, cloud_decoded_tokens=0, device_tokens=0, cost=0.0,
        device_energy_j=0.0, error=_one_line(failure),
    )  # fmt: skip
    if request.output_tokens == 0:
        fields.update(outcome="empty", finish_reason="none", error="the trace's answer has no tokens")
        return RequestRow(**fields), ()
    if report is None:
        return RequestRow(**fields), ()  # refused: no energy counted
    tbt = report.tbt_s
    usage = report.usage
    kinds = [m.kind for m in report.migrations]
    fields.update(
        outcome="completed" if report.finish_reason in ("stop", "length") else "failed",
        finish_reason=report.finish_reason, tokens=report.tokens,
        ttft_s=report.ttft_s if report.ttft_s is not None else nan,
        tbt_p50_s=statistics.median(tbt) if tbt else nan, tbt_mean_s=statistics.fmean(tbt) if tbt else nan,
        tbt_max_s=max(tbt) if tbt else nan, qoe=report.qoe,
        endpoints="+".join(report.endpoints_used), migrations=kinds.count("migration"),
        failovers=kinds.count("failover"),
        cloud_tokens=_tokens(usage.get("cloud")), cloud_decoded_tokens=_decoded(usage.get("cloud")),
        device_tokens=_tokens(usage.get("device")), cost=report.total_cost, device_energy_j=device_energy_j,
    )  # fmt: skip
    return RequestRow(**fields), tbt


def _tokens(usage: Any) -> int:
    return 0 if usage is None else int(usage.prefilled_tokens + usage.offered_tokens)


def _decoded(usage: Any) -> int:
    return 0 if usage is None else int(usage.offered_tokens)


def _one_line(error: BaseException | None) -> str:
    return "" if error is None else " ".join(str(error).split()) or type(error).__name__
