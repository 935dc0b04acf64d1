"""Operating a server: several processes on one port, graceful drain, the limits that protect it.
The command line (``--workers``, SIGTERM): test_server_workers.py."""

from __future__ import annotations

import socket

import pytest
import trio

from cloud_support import (
    TOKEN,
    StubBackend,
    client_context,
    drain,
    handshake,
    raw_connect,
    running_server,
    start_server,
    trio_test,
    wait_until,
)
from pydisco import RuntimeConfig, open_runtime
from pydisco._errors import EndpointUnavailable
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink
from pydisco.cloud import open_cloud_endpoint
from pydisco.cloud import protocol as P
from pydisco.cloud._server import _FrameBucket
from pydisco.policies._base import Slo
from pydisco.testing import ScriptedEndpoint

NETWORK = ["ws", "quic"]


def ask(n: int = 3, rid: str = "") -> GenerationRequest:
    return GenerationRequest(prompt="x", max_tokens=n, request_id=rid)


def stub_tokens(n: int) -> list[TokenPiece]:
    return [TokenPiece(i, i, f"t{i} ") for i in range(n)]  # what StubBackend emits


def plain(pieces: list[TokenPiece]) -> list[tuple[int, int, str]]:
    return [(p.position, p.token_id, p.text) for p in pieces]  # without the age the link adds


class GatedBackend:
    """Emits ``before`` tokens, waits for ``release``, then emits the rest: an answer in
    flight for exactly as long as a test wants."""

    model_id = "gated"

    def __init__(self, before: int) -> None:
        self.before = before
        self.release = trio.Event()
        self.waiting = 0

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        for k in range(request.start_position, request.max_tokens):
            if k == self.before:
                self.waiting += 1
                try:
                    await self.release.wait()
                finally:
                    self.waiting -= 1
            sink(TokenPiece(k, k, f"t{k} "))
            await trio.lowlevel.checkpoint()
        return GenerationResult("length", 1, 1, request.max_tokens - request.start_position)


# -- several processes on one port ---------------------------------------------------------


@pytest.mark.parametrize("scheme", NETWORK)
@trio_test(60)
async def test_two_servers_sharing_a_port_both_serve(scheme: str) -> None:
    clients = 32
    async with trio.open_nursery() as nursery:
        first, _ = await start_server(nursery, StubBackend(model_id="first"), [scheme], reuse_port=True)
        port = first.listeners[0].port
        second, _ = await start_server(nursery, StubBackend(model_id="second"), [scheme], reuse_port=True,
                                       url=f"{scheme}://127.0.0.1:{port}")  # fmt: skip
        assert second.listeners[0].port == port
        models: list[str | None] = []
        answers: list[list[TokenPiece]] = []

        async def one_client() -> None:
            got: list[TokenPiece] = []
            async with open_cloud_endpoint(first.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
                await cloud.generate(ask(5), got.append)
                models.append(cloud.statistics().server_model)
            answers.append(got)

        async with trio.open_nursery() as clients_nursery:
            for _ in range(clients):
                clients_nursery.start_soon(one_client)
        done = first.statistics().streams_completed, second.statistics().streams_completed
        nursery.cancel_scope.cancel()
    assert all(plain(got) == plain(stub_tokens(5)) for got in answers) and len(answers) == clients
    assert sorted(set(models)) == ["first", "second"]  # the kernel spread the clients over both
    assert sum(done) == clients and min(done) > 0


@trio_test(20)
async def test_a_port_is_shared_only_when_every_server_asks() -> None:
    async with running_server(StubBackend(), ["ws"]) as server:  # no reuse_port
        with pytest.raises(OSError):
            async with running_server(StubBackend(), ["ws"], reuse_port=True, url=server.urls[0]):
                pass


def test_reuse_port_is_refused_for_a_transport_that_cannot_share() -> None:
    from pydisco._errors import ConfigurationError
    from cloud_support import server_config

    with pytest.raises(ConfigurationError, match="memory"):
        server_config(StubBackend(), ["memory"], reuse_port=True)


# -- drain ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", NETWORK)
@trio_test(60)
async def test_drain_finishes_the_answers_in_flight_and_then_refuses(scheme: str) -> None:
    backend = GatedBackend(before=3)
    tls = client_context(scheme)
    async with trio.open_nursery() as nursery:
        server, life = await start_server(nursery, backend, [scheme])
        url = server.urls[0]
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as busy, \
                open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as idle:  # fmt: skip
            backend.release.set()
            await idle.generate(ask(4), lambda p: None)  # connected, no answer in flight
            backend.release = trio.Event()
            got: list[TokenPiece] = []
            result: list[GenerationResult] = []

            async def in_flight() -> None:
                result.append(await busy.generate(ask(10), got.append))

            nursery.start_soon(in_flight)
            await wait_until(lambda: backend.waiting == 1)
            drained = trio.Event()

            async def drain_server() -> None:
                await server.drain(30)
                drained.set()

            nursery.start_soon(drain_server)
            await wait_until(lambda: server.statistics().draining)
            await wait_until(lambda: not idle.statistics().connected)  # closed at once: nothing in flight
            with pytest.raises(EndpointUnavailable) as refused:
                await busy.generate(ask(2), lambda p: None)  # same connection, new answer
            assert refused.value.code == P.Code.SHUTTING_DOWN
            async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls, connect_timeout=5) as late:
                with pytest.raises(EndpointUnavailable):
                    await late.generate(ask(2), lambda p: None)  # a new connection
            assert not drained.is_set() and not result  # the answer in flight holds the drain
            backend.release.set()
            with trio.fail_after(20):
                await drained.wait()
                await life.stopped.wait()  # serve() returned by itself
    assert plain(got) == plain(stub_tokens(10)) and result[0].finish_reason == "length"
    stats = server.statistics()
    assert stats.streams_completed == 2 and stats.streams_cancelled == 0 and stats.connections_open == 0


@pytest.mark.parametrize("scheme", NETWORK)
@trio_test(60)
async def test_the_drain_deadline_closes_the_rest_and_the_runtime_fails_over_losing_no_token(scheme: str) -> None:
    length = 30
    backend = GatedBackend(before=5)  # never released: only the deadline ends this answer
    config = RuntimeConfig(device_model=None, dispatch="cloud-only", migration="never", slo=Slo(reading_rate=400.0))
    async with trio.open_nursery() as nursery:
        server, life = await start_server(nursery, backend, [scheme])
        async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
            device = ScriptedEndpoint("device", stub_tokens(length), prefill_s=0.01, gaps_s=[0.002])
            async with open_runtime(config, endpoints={"device": device, "cloud": cloud}) as rt:
                async with rt.stream(prompt="x", max_tokens=length) as answer:
                    async for piece in answer:
                        if piece.position == 4:
                            nursery.start_soon(server.drain, 0.2)
                report = answer.report
        with trio.fail_after(10):
            await life.stopped.wait()
    assert report.text == "".join(p.text for p in stub_tokens(length)) and report.finish_reason == "length"
    (failover,) = report.migrations
    assert (failover.kind, failover.source, failover.target) == ("failover", "cloud", "device")
    assert failover.handover_position == 5
    assert server.statistics().streams_cancelled == 1


@trio_test(20)
async def test_drain_with_nothing_in_flight_returns_at_once_and_serve_returns() -> None:
    async with trio.open_nursery() as nursery:
        server, life = await start_server(nursery, StubBackend(), ["ws"], drain_timeout=3600)
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            await cloud.generate(ask(2), lambda p: None)
            with trio.fail_after(5):
                await server.drain()
                await life.stopped.wait()
            assert not cloud.statistics().connected
    status, _, body = server.health()
    assert status == 503 and b"draining" in body
    assert b"pydisco_server_draining 1.0" in server.metrics.exposition()


# -- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", NETWORK)
@trio_test(60)
async def test_connections_per_address_are_limited(scheme: str) -> None:
    tls = client_context(scheme)
    async with running_server(StubBackend(), [scheme], max_connections_per_address=2) as server:
        url = server.urls[0]
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as one:
            await one.generate(ask(2), lambda p: None)
            async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as two:
                await two.generate(ask(2), lambda p: None)
                async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as three:
                    with pytest.raises(EndpointUnavailable) as refused:
                        await three.generate(ask(2), lambda p: None)
                    assert refused.value.code == P.Code.TOO_MANY_CONNECTIONS
                    await two.generate(ask(2), lambda p: None)  # the others are untouched
            await wait_until(lambda: server.statistics().connections_open == 1)
            async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as again:
                await again.generate(ask(2), lambda p: None)  # a freed place is usable again
        stats = server.statistics()
    assert stats.connections_limited == 1 and stats.streams_completed == 4
    assert b"pydisco_server_connections_limited_total 1.0" in server.metrics.exposition()


def test_the_frame_bucket_allows_its_rate_and_a_one_second_burst() -> None:
    bucket = _FrameBucket(10.0, now=0.0)
    assert all(bucket.take(0.0) for _ in range(10))  # the burst
    assert not bucket.take(0.0)
    assert bucket.take(0.1) and not bucket.take(0.1)  # then one every 1/rate
    assert all(bucket.take(t / 10) for t in range(2, 50))  # at the rate, forever
    assert sum(bucket.take(100.0) for _ in range(50)) == 10  # an idle spell refills one second's worth only


@pytest.mark.parametrize("scheme", NETWORK)
@trio_test(60)
async def test_a_connection_sending_too_many_frames_is_closed_and_others_are_served(scheme: str) -> None:
    rate = 50
    tls = client_context(scheme)
    async with running_server(StubBackend(period=0.01), [scheme], max_frames_per_second=rate) as server:
        url = server.urls[0]
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=tls) as good:
            got: list[TokenPiece] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(good.generate, ask(40), got.append)
                flood = await raw_connect(url, scheme)
                await handshake(flood)
                try:
                    for n in range(4 * rate):
                        await flood.send_frame(0, P.encode(P.Ping(n)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # closed while flooding
                frames = [P.decode(d) for sid, d in await drain(flood) if sid == 0]
                await flood.aclose()
            errors = [f for f in frames if isinstance(f, P.Error)]
            assert [e.code for e in errors] == [P.Code.RATE_LIMITED]
            pongs = [f for f in frames if isinstance(f, P.Pong)]
            assert len(pongs) <= rate + 1  # the burst, and what refilled meanwhile at most
        stats = server.statistics()
    assert plain(got) == plain(stub_tokens(40))
    assert stats.connections_limited == 1 and stats.streams_completed == 1


@pytest.mark.parametrize("scheme", NETWORK)
@trio_test(60)
async def test_a_connection_that_never_authenticates_is_closed_at_the_handshake_deadline(scheme: str) -> None:
    deadline = 0.5
    async with running_server(StubBackend(), [scheme], handshake_timeout=deadline) as server:
        url = server.urls[0]
        async with open_cloud_endpoint(url, token=TOKEN, ssl_context=client_context(scheme)) as good:
            started = trio.current_time()  # before the server can start its clock
            raw = await raw_connect(url, scheme)
            await raw.send_frame(0, P.encode(P.Hello((1, 2))))  # and no auth, ever
            frames = [P.decode(d) for _, d in await drain(raw)]
            waited = trio.current_time() - started
            await raw.aclose()
            got: list[TokenPiece] = []
            await good.generate(ask(3), got.append)
        stats = server.statistics()
    assert isinstance(frames[0], P.Welcome)
    assert isinstance(frames[-1], P.Error) and frames[-1].code == P.Code.TIMEOUT
    assert waited >= deadline
    assert plain(got) == plain(stub_tokens(3)) and stats.protocol_errors == 1


@trio_test(30)
async def test_a_tcp_client_that_never_upgrades_to_websocket_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydisco.transports import websocket

    monkeypatch.setattr(websocket, "_UPGRADE_TIMEOUT", 0.3)
    async with running_server(StubBackend(), ["ws"]) as server:
        port = server.listeners[0].port
        lurker = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await lurker.connect(("127.0.0.1", port))
        with trio.fail_after(10):
            assert await lurker.recv(100) == b""  # the server hung up
        lurker.close()
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as good:
            await good.generate(ask(2), lambda p: None)


def test_limits_are_checked_in_the_config() -> None:
    from pydisco._errors import ConfigurationError
    from cloud_support import server_config

    for bad in ({"max_connections_per_address": 0}, {"max_frames_per_second": 0.5},
                {"max_frames_per_second": float("inf")}, {"drain_timeout": -1}):  # fmt: skip
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            server_config(StubBackend(), ["ws"], **bad)



@trio_test(20)
async def test_a_stopped_websocket_server_frees_its_port_at_once() -> None:
    async with trio.open_nursery() as nursery:
        first, life = await start_server(nursery, StubBackend(), ["ws"])
        async with open_cloud_endpoint(first.urls[0], token=TOKEN) as cloud:
            await cloud.generate(ask(2), lambda p: None)
            life.cancel()  # stopped (not drained), a client still connected
            await life.stopped.wait()
        second, second_life = await start_server(nursery, StubBackend(), ["ws"], url=first.urls[0])
        async with open_cloud_endpoint(second.urls[0], token=TOKEN) as cloud:
            await cloud.generate(ask(2), lambda p: None)
        second_life.cancel()
