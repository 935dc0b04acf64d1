"""Metrics in Prometheus' format: the server's /metrics and /healthz scraped over HTTP while
answers stream over a real loopback server, and the runtime's statistics and exporter. Parsed
with prometheus_client's own parser, never by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cloud_support import TOKEN, StubBackend, running_server, trio_test, wait_until
from process_support import Child
from pydisco import RuntimeConfig, open_runtime
from pydisco._errors import AuthenticationError, ConfigurationError
from pydisco._types import GenerationRequest, TokenPiece
from pydisco.cloud import ServerConfig, open_cloud_endpoint
from pydisco.observability.metrics import RuntimeCollector, TokenRate, exposition, parse_host_port
from pydisco.policies._base import Budget, Slo
from pydisco.runtime import QOE_BUCKETS
from pydisco.testing import ScriptedEndpoint

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels), as prometheus_client's parser reads the page."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def scrape(client: httpx.AsyncClient, url: str) -> Samples:
    response = await client.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


N = 40


@trio_test(60)
async def test_metrics_scraped_while_answers_stream_over_a_loopback_server() -> None:
    backend = StubBackend(period=0.02)
    async with running_server(backend, ["ws"], parallel=2, metrics_listen="127.0.0.1:0") as server:
        assert server.metrics_listener is not None
        url = server.metrics_listener.url
        got: dict[int, list[TokenPiece]] = {0: [], 1: []}
        async with httpx.AsyncClient(timeout=10) as http, open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            before = await scrape(http, url)
            assert value(before, "pydisco_server_tokens_generated_total") == 0
            assert value(before, "pydisco_server_ttft_seconds_count") == 0
            async with trio.open_nursery() as nursery:
                for i in got:
                    nursery.start_soon(cloud.generate, GenerationRequest(prompt="x", max_tokens=N), got[i].append)
                await wait_until(lambda: all(len(g) >= 5 for g in got.values()))
                during = await scrape(http, url)
                assert all(len(g) < N for g in got.values())  # scraped while both stream
                assert value(during, "pydisco_server_running_sequences") == 2
                assert value(during, "pydisco_server_queue_depth") == 0
                assert value(during, "pydisco_server_connections_open") == 1
                assert value(during, "pydisco_server_ttft_seconds_count") == 2
                tokens = value(during, "pydisco_server_tokens_generated_total")
                assert 10 <= tokens < 2 * N
                assert value(during, "pydisco_server_inter_token_seconds_count") == tokens - 2
                assert value(during, "pydisco_server_tokens_per_second") > 0
                assert value(during, "pydisco_server_answers_total", outcome="completed") == 0
            # A client with a wrong token is refused and counted.
            with pytest.raises(AuthenticationError):
                async with open_cloud_endpoint(server.urls[0], token="wrong") as intruder:
                    await intruder.generate(GenerationRequest(prompt="x", max_tokens=2), lambda p: None)
            after = await scrape(http, url)
    assert all(len(g) == N for g in got.values())
    assert value(after, "pydisco_server_answers_total", outcome="completed") == 2
    assert value(after, "pydisco_server_answers_started_total") == 2
    assert value(after, "pydisco_server_tokens_generated_total") == 2 * N
    assert value(after, "pydisco_server_ttft_seconds_count") == 2
    assert value(after, "pydisco_server_inter_token_seconds_count") == 2 * (N - 1)
    # The stub's gaps are 20 ms: every inter-token sample is in the buckets from 20 ms up.
    assert value(after, "pydisco_server_inter_token_seconds_bucket", le="0.01") == 0
    assert value(after, "pydisco_server_inter_token_seconds_bucket", le="+Inf") == 2 * (N - 1)
    assert value(after, "pydisco_server_running_sequences") == 0
    assert value(after, "pydisco_server_auth_failures_total") == 1
    assert value(after, "pydisco_server_connections_accepted_total") == 2


@trio_test(30)
async def test_healthz_and_what_else_the_metrics_listener_answers() -> None:
    async with running_server(StubBackend(), ["ws"], metrics_listen="127.0.0.1:0") as server:
        assert server.metrics_listener is not None
        url = server.metrics_listener.url
        async with httpx.AsyncClient(timeout=10) as http:
            health = await http.get(url + "/healthz")
            assert health.status_code == 200
            assert json.loads(health.text)["status"] == "serving"
            assert json.loads(health.text)["listeners"] == list(server.urls)
            assert (await http.get(url + "/nothing")).status_code == 404
            assert (await http.post(url + "/metrics", content=b"x")).status_code == 405
            head = await http.head(url + "/metrics")
            assert head.status_code == 200 and head.content == b""
            # A client that connects and says nothing does not hold the responder up.
            idle = await trio.open_tcp_stream("127.0.0.1", server.metrics_listener.port)
            assert (await http.get(url + "/healthz")).status_code == 200
            await idle.aclose()


@trio_test(30)
async def test_a_taken_metrics_port_is_a_clear_error() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
        async with running_server(StubBackend(), ["ws"], metrics_listen=f"127.0.0.1:{port}"):
            pass
    await listener.aclose()


def test_bad_metrics_addresses_are_refused() -> None:
    assert parse_host_port("[::1]:9100") == ("::1", 9100)
    assert parse_host_port("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("9100", "host:", ":9100", "host:99999", "host:http"):
        with pytest.raises(ConfigurationError, match="HOST:PORT"):
            parse_host_port(bad)
        with pytest.raises(ConfigurationError):
            ServerConfig(listen=["ws://127.0.0.1:0"], tokens=["t"], backend=StubBackend(), metrics_listen=bad)
    result = subprocess.run([sys.executable, "-m", "pydisco.cli", "serve", "--listen", "ws://127.0.0.1:0", "--token", "t",
                             "--metrics-listen", "nowhere"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def test_the_token_rate_is_over_its_window() -> None:
    rate = TokenRate(window_s=10.0)
    assert rate.per_second(100.0) == 0.0
    for i in range(20):
        rate.record(100.0 + i * 0.5)  # 2 tokens/s for 10 s
    assert rate.per_second(109.5) == pytest.approx(20 / 9.5)
    assert rate.per_second(115.0) == pytest.approx(9 / 10)  # the tokens after 105 s
    assert rate.per_second(130.0) == 0.0


# -- the runtime ---------------------------------------------------------------------------


def script(name: str, n: int) -> list[TokenPiece]:
    return [TokenPiece(position=i, token_id=(1000 if name == "cloud" else 0) + i, text=f"{name[0]}{i} ") for i in range(n)]


def test_runtime_statistics_and_its_exporter_count_answers_failovers_and_the_budget() -> None:
    endpoints = {
        "device": ScriptedEndpoint("device", script("device", 10), prefill_s=0.1, gaps_s=[0.01]),
        # the first cloud run fails after 3 tokens; later ones finish
        "cloud": ScriptedEndpoint("cloud", script("cloud", 10), prefill_s=0.05, gaps_s=[0.01], fails_after=3, fails_on_answer=0),
    }
    config = RuntimeConfig(
        device_model=None, virtual_time=True, slo=Slo(ttft_target_s=1.0, reading_rate=50.0), dispatch="cloud-only",
        migration="never", device_standby=False, budget=Budget("cloud", 0.9), silence_timeout_s=0.5,
    )  # fmt: skip

    async def main() -> tuple[object, bytes]:
        async with open_runtime(config, endpoints=endpoints) as rt:
            empty = rt.statistics()
            assert empty.answers == 0 and empty.budget_share_spent == 0.0
            for _ in range(3):
                async with rt.stream(prompt="hi", max_tokens=10) as answer:
                    async for _piece in answer:
                        pass
                await trio.sleep(60)  # past the cloud's backoff after its failure
            async with rt.stream(prompt="hi", max_tokens=10) as answer:
                async for _piece in answer:
                    break  # leaves early: cancelled
            registry = CollectorRegistry()
            registry.register(RuntimeCollector(rt))
            return rt.statistics(), exposition(registry)

    stats, page = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert stats.answers == 4  # type: ignore[attr-defined]
    assert stats.answers_by_outcome == {"length": 3, "cancelled": 1}  # type: ignore[attr-defined]
    assert stats.failovers == 1 and stats.migrations == 0  # type: ignore[attr-defined]
    assert stats.answers_by_endpoint == {"cloud": 4, "device": 1}  # type: ignore[attr-defined]
    assert stats.tokens_by_endpoint["device"] == 7  # type: ignore[attr-defined]  # after the failover at 3
    assert [b for b, _ in stats.qoe_buckets] == list(QOE_BUCKETS)  # type: ignore[attr-defined]
    assert stats.qoe_buckets[-1][1] == 4  # type: ignore[attr-defined]
    assert 0.5 < stats.budget_share_spent <= 1.0  # type: ignore[attr-defined]
    samples = parse(page.decode())
    assert value(samples, "pydisco_runtime_answers_total", outcome="length") == 3
    assert value(samples, "pydisco_runtime_answers_total", outcome="cancelled") == 1
    assert value(samples, "pydisco_runtime_failovers_total") == 1
    assert value(samples, "pydisco_runtime_migrations_total") == 0
    assert value(samples, "pydisco_runtime_answers_by_endpoint_total", endpoint="device") == 1
    assert value(samples, "pydisco_runtime_tokens_total", endpoint="device") == 7
    assert value(samples, "pydisco_runtime_qoe_count") == 4
    assert value(samples, "pydisco_runtime_qoe_bucket", le="+Inf") == 4
    assert value(samples, "pydisco_runtime_qoe_sum") == pytest.approx(stats.qoe_sum)  # type: ignore[attr-defined]
    assert value(samples, "pydisco_runtime_budget_share", endpoint="cloud") == 0.9
    assert value(samples, "pydisco_runtime_budget_share_spent", endpoint="cloud") == pytest.approx(stats.budget_share_spent)  # type: ignore[attr-defined]
    assert value(samples, "pydisco_runtime_late_tokens_total") == stats.late_tokens  # type: ignore[attr-defined]


@pytest.mark.model
def test_pydisco_serve_metrics_listen_serves_metrics_and_healthz() -> None:
    import re

    server = Child([sys.executable, "-m", "pydisco.cli", "serve", "--listen", "ws://127.0.0.1:0", "--token", "t",
                    "--threads", "1", "--metrics-listen", "127.0.0.1:0", "--log-json"])  # fmt: skip
    try:
        lines = server.read_until(r"^metrics on ", 1, timeout=120)
        listen = next(line.split()[-1] for line in lines if line.startswith("listening on "))
        metrics = next(line.split()[-1] for line in lines if line.startswith("metrics on "))
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics)

        @trio_test(120)
        async def ask() -> None:
            async with httpx.AsyncClient(timeout=10) as http:
                assert (await http.get(metrics.removesuffix("/metrics") + "/healthz")).status_code == 200
                async with open_cloud_endpoint(listen, token="t") as cloud:
                    got: list[TokenPiece] = []
                    await cloud.generate(GenerationRequest(prompt="Hello", max_tokens=4, request_id="q1"), got.append)
                samples = parse((await http.get(metrics)).text)
            assert value(samples, "pydisco_server_tokens_generated_total") == len(got) > 0
            assert value(samples, "pydisco_server_answers_total", outcome="completed") == 1

        ask()
        server.process.terminate()
        server.process.wait(60)
        stderr = server.stderr()
    finally:
        server.stop()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["answer_id"] == "q1" and r["message"].startswith("admitted") for r in records), stderr
