"""Andes' experiment on a real server: streamed answers under cyclic bursts, each read at its
user's reading rate, served by the batched llama.cpp engine under the andes step scheduler and
then under fcfs (the same engine, the same batch limit); the average QoE and the share of
answers with QoE >= 0.95 of each.

The server is the loopback cloud (``open_loopback_cloud``: TLS and a bearer token over
WebSocket, no emulated link) in front of a ``BatchedBackend``; the users are pydisco cloud
clients (``open_cloud_endpoint``), a few answers per connection. Each answer's reader takes its
tokens at the reading rate of an Andes trace record (``sharegpt_qoe_trace.json``, 3.8-5.1
tokens/s): the client sends that rate with the request and reports the reader's unread buffer
when it drifts from what the server can infer (``reader_report``, docs/protocol.md), so the
scheduler sees every reader. QoE is computed from the client-side arrival time of each token
(``pydisco.qoe``, Andes' definition, as the runtime's report does), from the moment the user
asked, with the record's TTFT target.

The load is sized from this machine: first twice the max batch (16) of the sampled answers
asked at once under fcfs measure the server's aggregate rate when full (tokens/s until fewer
than the max batch are left, prefills included, ``full_rate``); the sustainable arrival rate is that over the sampled answers' mean
length (as many readers as the aggregate rate over their mean reading rate, each reading an
answer for its length over that rate). The
arrivals are the Andes table's (``pydisco.papers._andes``): a mean of the sustainable rate over
its headroom, bursts of ``BURST_FACTOR`` times the mean (so 1.9x the sustainable rate) for 35 %
of each cycle, two cycles over ``seconds``. Prompts are counting prompts as long as the record's
prompt (the model keeps counting, so each answer has the record's length: an answer ending
early at an end of text would make the load lighter than planned).

The bound (``solo_bound_*``): the same planned answers served one at a time on the idle server
(``solo_outcomes``). On a CPU, prefill decides it: a prompt of a few hundred tokens misses its
1 s TTFT target even alone, so the bound is what a scheduler can be judged against here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import random
import ssl
import statistics
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from _slo_mix import counting_prompt
from _stats import percentile

from pydisco._errors import EndpointError
from pydisco._types import GenerationRequest, ReaderState, TokenPiece
from pydisco.batching import ReaderModel
from pydisco.cloud import BatchedBackend, CloudEndpoint, open_cloud_endpoint, open_loopback_cloud
from pydisco.device import BatchedEngine
from pydisco.papers._andes import CYCLES, HEADROOM, cyclic_bursts
from pydisco.papers._setup import default_data_dir
from pydisco.policies import Slo
from pydisco.qoe import qoe
from pydisco.workloads import TraceRequest, load_andes_qoe_trace

TRACE_FILE = pathlib.Path("traces") / "sharegpt_qoe_trace.json"
SCHEDULERS = ("andes", "fcfs")
MAX_BATCH = 8  # `pydisco serve --scheduler`'s default
N_CTX = 16384  # KV cells for the answers admitted at once (preempted ones keep theirs)
ANSWERS_PER_CONNECTION = 8  # below the server's limit of 16 streams on one connection
GOOD_QOE = 0.95
SOLO_TOKENS = 8  # tokens measured per answer in the solo bound (the rest at their mean gap)


@dataclasses.dataclass(frozen=True)
class PlannedAnswer:
    arrival_s: float  # from the run's start
    prompt: str
    max_tokens: int
    slo: Slo  # the record's TTFT target and reading rate


@dataclasses.dataclass
class Outcome:
    slo: Slo
    asked_s: float
    stamps: list[float]
    failed: str | None = None

    @property
    def score(self) -> float:
        """Andes' QoE of what the user received; an answer that failed scores 0 (never read whole)."""
        if self.failed is not None:
            return 0.0
        return qoe(self.stamps, self.slo.ttft_target_s, self.slo.reading_rate, self.asked_s)


class Reader:
    """A user reading one streamed answer at a steady rate: takes each token as it arrives
    (stamped on the Trio clock), whenever it has one unread, never faster than its rate. Its
    unread buffer is that fluid queue (``ReaderModel``, the server's own model of a remote
    reader); ``reader_state`` is what the cloud client reports to the server from."""

    def __init__(self, rate: float) -> None:
        self.stamps: list[float] = []
        self._buffer = ReaderModel(rate)

    def __call__(self, piece: TokenPiece) -> None:
        now = trio.current_time()
        self.stamps.append(now)
        self._buffer.deliver(1, now)

    def reader_state(self) -> ReaderState:
        return ReaderState(int(self._buffer.unread(trio.current_time())), self._buffer.rate)


def trace_path() -> pathlib.Path | None:
    data = default_data_dir()
    path = data / TRACE_FILE if data is not None else None
    return path if path is not None and path.is_file() else None


def sample_records(records: Sequence[TraceRequest], count: int, seed: int, max_answer_tokens: int | None) -> list[TraceRequest]:
    """``count`` records drawn (with a seed) from the trace, answers capped at ``max_answer_tokens``."""
    rng = random.Random(seed)
    chosen = [records[rng.randrange(len(records))] for _ in range(count)]
    if max_answer_tokens is None:
        return chosen
    return [dataclasses.replace(r, output_tokens=min(r.output_tokens, max_answer_tokens)) for r in chosen]


def plan(records: Sequence[TraceRequest], sustainable_per_s: float, seconds: float, seed: int) -> list[PlannedAnswer]:
    """Arrivals over ``seconds`` in the Andes table's bursts around ``sustainable / HEADROOM``,
    each answer one of ``records`` in turn (their SLOs, prompt and answer lengths)."""
    arrivals = cyclic_bursts(sustainable_per_s / HEADROOM, seconds / CYCLES)
    rng = random.Random(seed)
    out: list[PlannedAnswer] = []
    t = arrivals.next_arrival(0.0, rng)
    while t < seconds:
        record = records[len(out) % len(records)]
        slo = record.slo or Slo()
        out.append(PlannedAnswer(t, counting_prompt(record.prompt_tokens, rng), max(1, record.output_tokens), slo))
        t = arrivals.next_arrival(t, rng)
    return out


@contextlib.asynccontextmanager
async def _clients(url: str, token: str, ssl_context: ssl.SSLContext, count: int) -> AsyncIterator[list[CloudEndpoint]]:
    """``count`` connected cloud clients (connected by a one-token answer each, so the runs'
    TTFTs hold no handshake)."""
    async with contextlib.AsyncExitStack() as stack:
        clients: list[CloudEndpoint] = []
        for _ in range(count):
            clients.append(await stack.enter_async_context(open_cloud_endpoint(url, token=token, ssl_context=ssl_context)))
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.generate, GenerationRequest(prompt="1, 2,", max_tokens=1), lambda _: None)
        yield clients


async def _answer(client: CloudEndpoint, request: GenerationRequest, slo: Slo) -> Outcome:
    reader = Reader(slo.reading_rate)
    outcome = Outcome(slo, trio.current_time(), reader.stamps)
    try:
        await client.generate(request, reader)
    except EndpointError as e:
        outcome.failed = e.code or "failed"
    return outcome


@contextlib.asynccontextmanager
async def _serving(engine: BatchedEngine, scheduler: str, connections: int) -> AsyncIterator[tuple[BatchedBackend, list[CloudEndpoint]]]:
    """A loopback server whose backend serves ``engine`` under ``scheduler``, and ``connections``
    clients connected to it; afterwards the engine is cleared (the next run starts cold too)."""
    backend = BatchedBackend.start(engine, scheduler)
    try:
        async with open_loopback_cloud(backend=backend, profile=None) as cloud:
            async with _clients(cloud.direct_url, cloud.token, cloud.ssl_context, connections) as clients:
                yield backend, clients
    finally:
        backend.close()
        engine.clear()


async def serve_plan(engine: BatchedEngine, scheduler: str, answers: Sequence[PlannedAnswer]) -> dict[str, Any]:
    """The planned answers through a loopback server whose backend serves ``engine`` under
    ``scheduler``: their outcomes and the step loop's counts."""
    outcomes: list[Outcome] = []
    connections = max(1, math.ceil(len(answers) / ANSWERS_PER_CONNECTION))
    async with _serving(engine, scheduler, connections) as (backend, clients):
        start = trio.current_time()

        async def one(i: int, planned: PlannedAnswer) -> None:
            request = GenerationRequest(prompt=planned.prompt, max_tokens=planned.max_tokens, request_id=f"a{i}")
            outcomes.append(await _answer(clients[i % len(clients)], request, planned.slo))

        async with trio.open_nursery() as nursery:
            for i, planned in enumerate(answers):
                await trio.sleep_until(start + planned.arrival_s)
                nursery.start_soon(one, i, planned)
        reports = sum(c.statistics().reader_reports for c in clients)
        loop = backend.statistics()
    return {"outcomes": outcomes, "preemptions": loop.preemptions, "rejected": loop.rejected, "reader_reports": reports}


async def solo_outcomes(engine: BatchedEngine, answers: Sequence[PlannedAnswer]) -> list[Outcome]:
    """Each planned answer served alone, one after another, through the same loopback server:
    its first ``SOLO_TOKENS`` tokens are measured and the rest extrapolated at their mean gap
    (a lone stream decodes far faster than anyone reads, so its QoE is decided by its first
    token). No scheduler can do better than this on this machine: it bounds the figures."""
    outcomes: list[Outcome] = []
    async with _serving(engine, "fcfs", 1) as (_, (client,)):
        for i, planned in enumerate(answers):
            request = GenerationRequest(prompt=planned.prompt, max_tokens=min(planned.max_tokens, SOLO_TOKENS),
                                        request_id=f"solo{i}")  # fmt: skip
            outcome = await _answer(client, request, planned.slo)
            stamps = outcome.stamps
            if len(stamps) >= 2 and planned.max_tokens > len(stamps):
                gap = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
                stamps += [stamps[-1] + gap * k for k in range(1, planned.max_tokens - len(stamps) + 1)]
            outcomes.append(outcome)
    return outcomes


def full_rate(outcomes: Sequence[Outcome], max_batch: int) -> float:
    """Tokens/s delivered from the first request until fewer than ``max_batch`` answers are
    left (the server full all along: prefills and decodes as they come)."""
    ends = sorted(o.stamps[-1] for o in outcomes if o.stamps)
    start = min(o.asked_s for o in outcomes)
    end = ends[max(0, len(outcomes) - max_batch)]
    return sum(1 for o in outcomes for t in o.stamps if t <= end) / (end - start)


async def aggregate_rate(engine: BatchedEngine, records: Sequence[TraceRequest]) -> float:
    """The server's tokens/s when full (``full_rate``): ``records``' answers all asked at once,
    under fcfs."""
    answers = plan_all_at_once(records)
    result = await serve_plan(engine, "fcfs", answers)
    return full_rate(result["outcomes"], engine.max_batch)


def plan_all_at_once(records: Sequence[TraceRequest]) -> list[PlannedAnswer]:
    rng = random.Random(0)
    return [PlannedAnswer(0.0, counting_prompt(r.prompt_tokens, rng), max(1, r.output_tokens), r.slo or Slo()) for r in records]


def _summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    scores = [o.score for o in outcomes]
    ttfts = [o.stamps[0] - o.asked_s for o in outcomes if o.stamps and o.failed is None]
    return {
        "avg_qoe": statistics.fmean(scores),
        "qoe95_share": sum(s >= GOOD_QOE for s in scores) / len(scores),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "failed": sum(o.failed is not None for o in outcomes),
    }


def server_qoe(seconds: float | None, threads: int, *, answers: int | None = None, seed: int = 0,
               max_answer_tokens: int | None = None, max_batch: int = MAX_BATCH,
               path: pathlib.Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The server part's figures (``andes_*``, ``fcfs_*`` and what they were measured under):
    ``seconds`` of arrivals per scheduler, or (None) as long as ``answers`` take to arrive at the
    mean rate (the arrivals scale with the rate, so a seed gives the same number of answers on any
    machine); answers capped at ``max_answer_tokens``; ``max_batch`` sequences decode at once."""
    records = load_andes_qoe_trace(path or trace_path() or TRACE_FILE)
    sample = sample_records(records, 500, seed, max_answer_tokens)
    mean_answer = statistics.fmean(r.output_tokens for r in sample)
    mean_rate = statistics.fmean(r.slo.reading_rate for r in sample if r.slo is not None)
    with BatchedEngine(max_batch=max_batch, n_ctx=N_CTX, n_threads=threads) as engine:
        aggregate = trio.run(aggregate_rate, engine, sample[: 2 * max_batch])
        sustainable = aggregate / mean_answer
        if seconds is None:
            if answers is None:
                raise ValueError("give seconds or answers")
            seconds = answers * HEADROOM / sustainable
        planned = plan(sample, sustainable, seconds, seed)
        bursts = cyclic_bursts(sustainable / HEADROOM, seconds / CYCLES)
        figures: dict[str, Any] = {
            "server_aggregate_tok_s": aggregate,
            "server_mean_answer_tokens": mean_answer,
            "server_mean_reading_rate": mean_rate,
            "server_sustainable_readers": aggregate / mean_rate,
            "server_sustainable_per_s": sustainable,
            "server_burst_per_s": bursts.burst_rate_per_s,
            "server_base_per_s": bursts.base_rate_per_s,
            "server_burst_vs_sustainable": bursts.burst_rate_per_s / sustainable,
            "server_cycle_s": bursts.period_s,
            "server_burst_s": bursts.burst_s,
            "server_answers": len(planned),
            "server_seconds": seconds,
            "server_max_batch": max_batch,
            "server_max_answer_tokens": max_answer_tokens,
        }
        solo = _summary(trio.run(solo_outcomes, engine, planned))
        figures |= {"solo_bound_avg_qoe": solo["avg_qoe"], "solo_bound_qoe95_share": solo["qoe95_share"],
                    "solo_bound_ttft_mean_s": solo["ttft_mean_s"]}  # fmt: skip
        for name in SCHEDULERS:
            result = trio.run(serve_plan, engine, name, planned)
            summary = _summary(result["outcomes"])
            figures |= {f"{name}_{key}": value for key, value in summary.items()}
            figures |= {f"{name}_preemptions": result["preemptions"], f"{name}_reader_reports": result["reader_reports"],
                        f"{name}_rejected": result["rejected"], f"{name}_load_average": os.getloadavg()[0]}  # fmt: skip
    return figures
