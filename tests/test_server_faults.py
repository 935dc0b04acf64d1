"""Faults found by driving a real server and client with bad input: each test runs a real
server (stub backend, no model) on loopback and does what a broken or hostile peer does."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from cloud_support import (
    TOKEN,
    StubBackend,
    client_context,
    client_tls,
    drain,
    handshake,
    raw_connect,
    running_server,
    server_config,
    trio_test,
    wait_until,
)
from transport_schemes import SCHEMES
from pydisco.cloud import open_cloud_endpoint, open_loopback_cloud, serve
from pydisco.cloud import protocol as P
from pydisco.linkemu import LinkControl, LinkProfile, serve_udp_proxy
from pydisco._types import GenerationRequest, GenerationResult
from pydisco import transports
from pydisco.transports import _quic_config, memory, quic, websocket, zenoh

LOCAL = "127.0.0.1"
FOREVER = 10**6  # max_tokens of an answer that only ends when cancelled


def ask(n: int = 3) -> GenerationRequest:
    return GenerationRequest(prompt="x", max_tokens=n)


def no_warnings_from_pydisco(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.startswith("pydisco") and r.levelno >= logging.WARNING]  # fmt: skip


# -- a client that closes cleanly while the server still has frames for it -----------------

CONNECTION_CLASSES = {"memory": memory.MemoryConnection, "ws": websocket.WebSocketConnection,
                      "wss": websocket.WebSocketConnection, "quic": quic.QuicFrameConnection,
                      "zenoh": zenoh.ZenohConnection}  # fmt: skip


class SendLog:
    """Every send_frame the server's connections attempt, until :meth:`stop`: (frame, the
    exception it raised)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[P.Frame, BaseException | None]] | None = []
        self.client_side: set[int] = set()  # id() of connections the test opened

    def patch(self, monkeypatch: pytest.MonkeyPatch, cls: type[Any]) -> None:
        original = cls.send_frame
        log = self

        async def send_frame(conn: Any, stream_id: int, frame: bytes) -> None:
            if log.attempts is None or id(conn) in log.client_side:
                return await original(conn, stream_id, frame)  # type: ignore[no-any-return]
            try:
                await original(conn, stream_id, frame)
            except BaseException as e:
                log.attempts.append((P.decode(frame), e))
                raise
            log.attempts.append((P.decode(frame), None))

        monkeypatch.setattr(cls, "send_frame", send_frame)

    def stop(self) -> list[tuple[P.Frame, BaseException | None]]:
        attempts, self.attempts = self.attempts or [], None
        return attempts


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(30)
async def test_a_client_that_closes_cleanly_mid_answer_is_a_peer_gone(
    scheme: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends = SendLog()
    sends.patch(monkeypatch, CONNECTION_CLASSES[scheme])
    backend = StubBackend(period=0.001)
    with caplog.at_level(logging.DEBUG, logger="pydisco"):
        async with running_server(backend, [scheme]) as server:
            conn = await raw_connect(server.urls[0], scheme)
            sends.client_side.add(id(conn))
            proto = await handshake(conn)
            sid, data = proto.open_stream(ask(FOREVER))
            await conn.send_frame(sid, data)
            for _ in range(3):  # the answer is streaming
                assert isinstance(P.decode((await conn.receive_frame())[1]), P.Token)
            await conn.aclose()  # a clean close: WebSocket code 1000, QUIC NO_ERROR
            await wait_until(lambda: backend.cancelled == 1)  # not after a million tokens
            await wait_until(lambda: server.statistics().connections_open == 0)
            sent = sends.stop()
            async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
                await cloud.generate(ask(3), lambda piece: None)  # the server serves on
            stats = server.statistics()
    assert stats.streams_cancelled == 1 and stats.protocol_errors == 0 and stats.streams_completed == 1
    failed = [i for i, (_, error) in enumerate(sent) if error is not None]
    assert not failed or failed == [len(sent) - 1]  # nothing more is tried once a send failed
    assert not any(isinstance(frame, P.Error) for frame, _ in sent)  # no shutting_down
    assert no_warnings_from_pydisco(caplog) == []
    assert "connection session failed" not in caplog.text


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(15)
async def test_a_stopping_server_tells_its_clients_shutting_down(scheme: str) -> None:
    async with running_server(StubBackend(period=0.001), [scheme]) as server:
        conn = await raw_connect(server.urls[0], scheme)
        proto = await handshake(conn)
        sid, data = proto.open_stream(ask(FOREVER))
        await conn.send_frame(sid, data)
        await conn.receive_frame()
    frames = [P.decode(data) for _, data in await drain(conn)]
    assert frames[-1] == P.Error(P.Code.SHUTTING_DOWN, "the server is shutting down")
    await conn.aclose()


# -- two answers at once on one QUIC connection, the lower id overtaken -------------------


@trio_test(30)
async def test_quic_answers_whose_requests_arrive_out_of_order_both_complete() -> None:
    # The generate for stream 1 is lost on the way; the one for stream 3 gets through first, and
    # QUIC retransmits stream 1's later: the server sees 3 before 1.
    control = LinkControl()
    async with running_server(StubBackend(period=0.001), ["quic"]) as server:
        async with trio.open_nursery() as nursery:
            proxy_port: int = await nursery.start(functools.partial(
                serve_udp_proxy, LOCAL, 0, LOCAL, server.listeners[0].port, LinkProfile(), LinkProfile(),
                control=control))  # fmt: skip
            conn = await raw_connect(f"quic://{LOCAL}:{proxy_port}", "quic")
            proto = await handshake(conn)
            control.cut()
            sid, data = proto.open_stream(ask(5))
            await conn.send_frame(sid, data)
            await wait_until(lambda: control.statistics("up").dropped_while_cut >= 1)
            control.restore()
            later, data = proto.open_stream(ask(5))
            await conn.send_frame(later, data)
            done: dict[int, GenerationResult] = {}
            while len(done) < 2:
                stream_id, data = await conn.receive_frame()
                for out in proto.receive(stream_id, data):
                    assert not isinstance(out, P.CloseConnection), out
                    if isinstance(out, P.StreamDone):
                        done[out.stream_id] = out.result
            assert sorted(done) == [1, 3] and all(r.generated_tokens == 5 for r in done.values())
            assert server.statistics().protocol_errors == 0
            await conn.aclose()
            nursery.cancel_scope.cancel()


# -- a QUIC client that never opens its control stream ------------------------------------


class QuicLurker:
    """A raw aioquic client: completes the TLS handshake, then only sends PINGs (which keep a
    QUIC connection alive), never opening a stream."""

    def __init__(self, port: int, ping_every: float = 0.2) -> None:
        config = _quic_config.client_configuration(quic.QuicSettings(), client_tls(), LOCAL)
        self.quic = QuicConnection(configuration=config)
        self.addr = (LOCAL, port)
        self.ping_every = ping_every
        self.connected = trio.Event()
        self.connected_at = 0.0
        self.ended: events.ConnectionTerminated | None = None

    async def run(self) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.connect(self.addr)
            self.quic.connect(self.addr, now=trio.current_time())
            next_ping, pings = trio.current_time() + self.ping_every, 0
            while self.ended is None:
                for data, _ in self.quic.datagrams_to_send(now=trio.current_time()):
                    await sock.send(data)
                timer = self.quic.get_timer()
                wake = min(next_ping, timer if timer is not None else next_ping)
                with trio.move_on_at(wake):
                    data = await sock.recv(65535)
                    self.quic.receive_datagram(data, self.addr, now=trio.current_time())
                now = trio.current_time()
                if timer is not None and now >= timer:
                    self.quic.handle_timer(now)
                if now >= next_ping and self.connected.is_set():
                    pings += 1
                    self.quic.send_ping(pings)
                    next_ping = now + self.ping_every
                while (event := self.quic.next_event()) is not None:
                    if isinstance(event, events.HandshakeCompleted):
                        self.connected_at = trio.current_time()
                        self.connected.set()
                    elif isinstance(event, events.ConnectionTerminated):
                        self.ended = event


@pytest.fixture
def one_quic_connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(quic, "MAX_CONNECTIONS", 1)  # a lurker holding the slot locks out the rest
    yield


@trio_test(30)
async def test_a_quic_client_that_never_opens_its_control_stream_is_closed_at_the_deadline(
    one_quic_connection: None,
) -> None:
    deadline = 1.0
    async with running_server(StubBackend(), ["quic"], handshake_timeout=deadline) as server:
        lurker = QuicLurker(server.listeners[0].port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lurker.run)
            await lurker.connected.wait()
            # Held out while the lurker has the one slot; QUIC retransmits its first packet, with
            # backoff, until the lurker is closed and removed.
            async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_tls(),
                                           connect_timeout=25) as cloud:  # fmt: skip
                await cloud.generate(ask(2), lambda piece: None)
            await wait_until(lambda: lurker.ended is not None)
            assert lurker.ended is not None and trio.current_time() - lurker.connected_at >= deadline
        assert server.statistics().protocol_errors == 1  # the lurker's handshake timeout


# -- auth without a string token ----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["memory", "ws"])
@trio_test(15)
async def test_an_auth_frame_without_a_token_is_unauthorized_and_counted(scheme: str) -> None:
    async with running_server(StubBackend(), [scheme]) as server:
        conn = await raw_connect(server.urls[0], scheme)
        await conn.send_frame(0, P.encode(P.Hello((1,))))
        await conn.send_frame(0, P.encode(P.Auth(None)))
        frames = [P.decode(data) for _, data in await drain(conn)]
        await conn.aclose()
        await wait_until(lambda: server.statistics().connections_open == 0)
        assert isinstance(frames[0], P.Welcome)
        assert isinstance(frames[-1], P.Error) and frames[-1].code == P.Code.UNAUTHORIZED
        assert server.statistics().auth_failures == 1 and server.statistics().protocol_errors == 0


# -- an error in the body of a public context manager comes out unchanged -----------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("cancelled", [False, True], ids=["plain", "scope cancelled"])
@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(30)
async def test_open_cloud_endpoint_lets_the_bodys_error_out(scheme: str, cancelled: bool) -> None:
    boom = Boom()
    async with running_server(StubBackend(period=0.01), [scheme]) as server:
        with pytest.raises(Boom) as info, trio.CancelScope() as outer:
            async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
                async with trio.open_nursery() as nursery:  # an answer streams while the body fails
                    nursery.start_soon(cloud.generate, ask(FOREVER), lambda piece: None)
                    await wait_until(lambda: cloud.statistics().tokens > 0)
                    nursery.cancel_scope.cancel()
                if cancelled:
                    outer.cancel()  # closing must neither be cancelled into losing it nor swallow it
                raise boom
    assert info.value is boom


@pytest.mark.parametrize("cancelled", [False, True], ids=["plain", "scope cancelled"])
@pytest.mark.parametrize("transport", ["wss", "quic"])
@trio_test(30)
async def test_open_loopback_cloud_lets_the_bodys_error_out(transport: str, cancelled: bool) -> None:
    boom = Boom()
    with pytest.raises(Boom) as info, trio.CancelScope() as outer:
        async with open_loopback_cloud(backend=StubBackend(period=0.01), transport=transport, profile=None) as cloud:
            conn = await transports.connect(cloud.url, ssl_context=cloud.ssl_context)
            proto = await handshake(conn, cloud.token)
            sid, data = proto.open_stream(ask(FOREVER))
            await conn.send_frame(sid, data)
            await conn.receive_frame()  # a live link, mid-answer
            if cancelled:
                outer.cancel()
            raise boom
    assert info.value is boom


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(30)
async def test_a_nursery_running_serve_sees_only_the_bodys_error(scheme: str) -> None:
    boom = Boom()
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, server_config(StubBackend(period=0.01), [scheme]))
            conn = await raw_connect(server.urls[0], scheme)
            proto = await handshake(conn)
            sid, data = proto.open_stream(ask(FOREVER))
            await conn.send_frame(sid, data)
            await conn.receive_frame()
            raise boom
    assert info.value.exceptions == (boom,)
    frames = [P.decode(data) for _, data in await drain(conn)]
    assert isinstance(frames[-1], P.Error) and frames[-1].code == P.Code.SHUTTING_DOWN
    await conn.aclose()
