"""Metrics in Prometheus' exposition format, through ``prometheus_client``.

Counters and gauges are read from the objects' own ``statistics()`` at each scrape (a
collector, so nothing is counted twice); only what needs every event — the server's TTFT and
inter-token histograms and its recent token rate — is observed as it happens. Each server and
runtime has its own registry (``prometheus_client``'s global one is left to the application).

Server metrics (``ServerMetrics``, exposed on ``/metrics`` by ``pydisco serve
--metrics-listen``):

================================================  ======================================
pydisco_server_connections_accepted_total         connections accepted
pydisco_server_connections_open                   connections open now
pydisco_server_auth_failures_total                connections refused for their token
pydisco_server_protocol_errors_total              connections closed for bad frames, timeouts
pydisco_server_connections_limited_total         connections refused or closed by a limit
pydisco_server_draining                           1 while the server drains
pydisco_server_answers_started_total              answers that reached the backend
pydisco_server_answers_total{outcome}             answers ended: completed, cancelled, failed
pydisco_server_queue_depth                        answers waiting for the backend now
pydisco_server_running_sequences                  answers in the backend now
pydisco_server_tokens_generated_total             tokens the backend produced
pydisco_server_tokens_per_second                  tokens produced over the last 10 s, per second
pydisco_server_ttft_seconds                       histogram: request on the server to first token
pydisco_server_inter_token_seconds                histogram: between an answer's tokens
================================================  ======================================

Runtime metrics (``RuntimeCollector``, over ``Runtime.statistics()``): see docs/observability.md.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..cloud._server import ServerStatistics
    from ..runtime._statistics import RuntimeStatistics

__all__ = ["RuntimeCollector", "ServerMetrics", "TokenRate", "exposition"]

# Seconds; from a fast loopback server's few ms to a loaded one's seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
RATE_WINDOW_S = 10.0


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the text exposition format."""
    return generate_latest(registry)


class TokenRate:
    """Tokens per second over the last ``window_s`` seconds (of the clock ``record`` is given)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._times: collections.deque[float] = collections.deque()
        self._first: float | None = None

    def record(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._times.append(now)
        self._forget(now)

    def per_second(self, now: float) -> float:
        self._forget(now)
        if self._first is None:
            return 0.0
        # Until a whole window has passed, over the time since the first token.
        span = min(self._window_s, max(now - self._first, 1e-9))
        return len(self._times) / span

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] <= now - self._window_s:
            self._times.popleft()


class _AnswerTiming(Protocol):
    def token(self) -> None: ...


class ServerMetrics:
    """A server's registry: a collector over its statistics, and the per-token histograms.

    ``answer()`` gives each answer its timer: call ``token()`` on it for every token the
    backend produces. ``clock`` is the server's time base (Trio's clock, so virtual time works).
    """

    def __init__(self, statistics: Callable[[], ServerStatistics], clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self.ttft = Histogram("pydisco_server_ttft_seconds", "Seconds from a request reaching the server to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)  # fmt: skip
        self.inter_token = Histogram("pydisco_server_inter_token_seconds", "Seconds between consecutive tokens of an answer",
                                     buckets=INTER_TOKEN_BUCKETS, registry=self.registry)  # fmt: skip
        self.rate = TokenRate()
        self.registry.register(_ServerCollector(statistics, lambda: self.rate.per_second(clock())))

    def answer(self) -> _AnswerTimer:
        """A timer for one answer, started now (the request is on the server)."""
        return _AnswerTimer(self)

    def exposition(self) -> bytes:
        return exposition(self.registry)


class _AnswerTimer:
    __slots__ = ("_metrics", "_last", "_first")

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._last = metrics._clock()
        self._first = True

    def token(self) -> None:
        metrics = self._metrics
        now = metrics._clock()
        (metrics.ttft if self._first else metrics.inter_token).observe(now - self._last)
        self._first, self._last = False, now
        metrics.rate.record(now)


class _ServerCollector(Collector):
    def __init__(self, statistics: Callable[[], ServerStatistics], tokens_per_second: Callable[[], float]) -> None:
        self._statistics = statistics
        self._tokens_per_second = tokens_per_second

    def collect(self) -> Iterator[Metric]:
        s = self._statistics()
        p = "pydisco_server_"
        yield CounterMetricFamily(p + "connections_accepted", "Connections accepted", value=s.connections_accepted)
        yield GaugeMetricFamily(p + "connections_open", "Connections open now", value=s.connections_open)
        yield CounterMetricFamily(p + "auth_failures", "Connections refused for a wrong or missing token", value=s.auth_failures)
        yield CounterMetricFamily(p + "protocol_errors", "Connections closed for bad frames, bad streams or timeouts",
                                  value=s.protocol_errors)  # fmt: skip
        yield CounterMetricFamily(p + "connections_limited", "Connections refused or closed by a limit (per address, frame rate)",
                                  value=s.connections_limited)  # fmt: skip
        yield GaugeMetricFamily(p + "draining", "1 while the server drains (no new connections or answers)",
                                value=1 if s.draining else 0)  # fmt: skip
        yield CounterMetricFamily(p + "answers_started", "Answers that reached the backend", value=s.streams_started)
        answers = CounterMetricFamily(p + "answers", "Answers ended, by outcome", labels=["outcome"])
        answers.add_metric(["completed"], s.streams_completed)
        answers.add_metric(["cancelled"], s.streams_cancelled)
        answers.add_metric(["failed"], s.streams_failed)
        yield answers
        yield GaugeMetricFamily(p + "queue_depth", "Answers waiting for the backend now", value=s.queued)
        yield GaugeMetricFamily(p + "running_sequences", "Answers in the backend now", value=s.running)
        yield CounterMetricFamily(p + "tokens_generated", "Tokens the backend produced", value=s.tokens_generated)
        yield GaugeMetricFamily(p + "tokens_per_second", f"Tokens produced per second over the last {RATE_WINDOW_S:g} s",
                                value=self._tokens_per_second())  # fmt: skip


class RuntimeCollector(Collector):
    """A Prometheus collector over a runtime's ``statistics()`` (a ``Runtime`` or a
    ``BlockingRuntime``, or any callable returning ``RuntimeStatistics``)::

        registry = prometheus_client.CollectorRegistry()
        registry.register(RuntimeCollector(runtime))

    Read at each scrape; from another thread than the runtime's, use a BlockingRuntime (its
    ``statistics()`` reads in the runtime's thread).
    """

    def __init__(self, runtime: object) -> None:
        statistics = getattr(runtime, "statistics", runtime)
        if not callable(statistics):
            raise TypeError("RuntimeCollector needs a runtime (with statistics()) or a callable")
        self._statistics: Callable[[], RuntimeStatistics] = statistics

    def collect(self) -> Iterator[Metric]:
        s = self._statistics()
        p = "pydisco_runtime_"
        by_outcome = CounterMetricFamily(p + "answers", "Answers streamed, by finish reason", labels=["outcome"])
        for outcome, n in sorted(s.answers_by_outcome.items()):
            by_outcome.add_metric([outcome], n)
        yield by_outcome
        by_endpoint = CounterMetricFamily(p + "answers_by_endpoint", "Answers each endpoint committed tokens to",
                                          labels=["endpoint"])  # fmt: skip
        for endpoint, n in sorted(s.answers_by_endpoint.items()):
            by_endpoint.add_metric([endpoint], n)
        yield by_endpoint
        tokens = CounterMetricFamily(p + "tokens", "Tokens committed, by the endpoint that produced them", labels=["endpoint"])
        for endpoint, n in sorted(s.tokens_by_endpoint.items()):
            tokens.add_metric([endpoint], n)
        yield tokens
        yield CounterMetricFamily(p + "migrations", "Handovers a policy decided", value=s.migrations)
        yield CounterMetricFamily(p + "failovers", "Handovers because the generating endpoint failed", value=s.failovers)
        yield CounterMetricFamily(p + "late_tokens", "Tokens released more than 1 ms after their pacing deadline",
                                  value=s.late_tokens)  # fmt: skip
        buckets = [(f"{bound:g}", count) for bound, count in s.qoe_buckets] + [("+Inf", s.answers)]
        yield HistogramMetricFamily(p + "qoe", "Answers' QoE (Andes)", buckets=buckets, sum_value=s.qoe_sum)
        share = GaugeMetricFamily(p + "budget_share_spent", "Share of the workload's tokens the budget's endpoint processed",
                                  labels=["endpoint"])  # fmt: skip
        share.add_metric([s.budget.constrained], s.budget_share_spent)
        yield share
        allowed = GaugeMetricFamily(p + "budget_share", "Share of the workload's tokens the budget's endpoint may process",
                                    labels=["endpoint"])  # fmt: skip
        allowed.add_metric([s.budget.constrained], s.budget.share)
        yield allowed
