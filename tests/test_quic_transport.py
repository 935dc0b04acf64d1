"""The QUIC transport on loopback: real UDP sockets, throwaway certificates (trustme), port 0,
every test under an absolute time limit."""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
import trustme

from pydisco._errors import ConfigurationError
from pydisco.linkemu import LinkControl, LinkProfile, serve_udp_proxy

if TYPE_CHECKING:  # mypy reads the source tree
    from pydisco.transports import _base, _quic_config, quic
else:
    try:
        from pydisco.transports import _base, _quic_config, quic
    except ImportError:  # a source tree without the installed package
        from pydisco.transports import _base, _quic_config, quic

LOCAL = "127.0.0.1"
Handler = Callable[[Any], Awaitable[None]]

CA = trustme.CA()
OTHER_CA = trustme.CA()
CERT = CA.issue_cert(LOCAL)
SERVER = quic.QuicSettings(certificate_chain=CERT.private_key_and_cert_chain_pem.bytes())


def client_context(ca: trustme.CA = CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def run(test: Callable[[], Awaitable[None]], limit: float = 10.0, clock: Any = None) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await test()

    trio.run(main, clock=clock)


async def start_server(
    nursery: trio.Nursery, handler: Handler, settings: quic.QuicSettings = SERVER, **kw: Any
) -> _base.ListenerInfo:
    info: _base.ListenerInfo = await nursery.start(
        functools.partial(quic.transport.serve, handler, LOCAL, 0, settings=settings, **kw)
    )
    return info


async def connect(url: str, **kw: Any) -> quic.QuicFrameConnection:
    kw.setdefault("ssl_context", client_context())
    return await quic.transport.connect(url, **kw)


async def echo(conn: Any) -> None:
    """Echo frames; say "too large" on stream 0 for an oversized one; end a stream on b"end"."""
    while True:
        try:
            sid, frame = await conn.receive_frame()
        except _base.FrameTooLarge:
            await conn.send_frame(0, b"too large")
            continue
        except (trio.EndOfChannel, trio.BrokenResourceError):
            return
        await conn.send_frame(sid, frame)
        if frame == b"end":
            await conn.end_stream(sid)


def test_the_transport_object_meets_the_contract() -> None:
    transport: _base.Transport = quic.transport
    assert transport.schemes == ("quic",)


def test_frames_round_trip_on_concurrent_streams() -> None:
    streams, per_stream = [1, 3, 5, 7, 9, 11], 40

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, echo)
            assert info.scheme == "quic" and info.port > 0
            conn = await connect(info.url)
            got: dict[int, list[bytes]] = {sid: [] for sid in streams}

            async def sender(sid: int) -> None:
                for i in range(per_stream):
                    await conn.send_frame(sid, b"%d:%d" % (sid, i) * (i % 7))
                    await trio.sleep(0)

            async with trio.open_nursery() as senders:
                for sid in streams:
                    senders.start_soon(sender, sid)
                for _ in range(len(streams) * per_stream):
                    sid, frame = await conn.receive_frame()
                    got[sid].append(frame)
            for sid in streams:
                assert got[sid] == [b"%d:%d" % (sid, i) * (i % 7) for i in range(per_stream)]
            await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_request_streams_are_recycled_past_quics_stream_credit() -> None:
    # QUIC grants 128 open streams at a time; ending each stream both ways must free it.
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, echo)
            conn = await connect(info.url)
            for sid in range(1, 2 * 300, 2):
                await conn.send_frame(sid, b"end")
                assert await conn.receive_frame() == (sid, b"end")
                await conn.end_stream(sid)
            await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_streams_never_ended_hit_the_credit_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, echo)
            conn = await connect(info.url)
            sids = range(1, 2 * 127, 2)  # with the control stream: all 128 streams of credit
            for sid in sids:
                await conn.send_frame(sid, b"open")
            assert {await conn.receive_frame() for _ in sids} == {(sid, b"open") for sid in sids}
            assert "end_stream" not in caplog.text
            await conn.send_frame(1001, b"held back")
            with trio.move_on_after(0.3) as held:
                await conn.receive_frame()
            assert held.cancelled_caught
            assert "frames on stream 1001 wait" in caplog.text
            for sid in sids[:2]:  # free two: the echo server ends a stream on b"end"
                await conn.send_frame(sid, b"end")
                await conn.end_stream(sid)
            got = {await conn.receive_frame() for _ in range(3)}
            assert (1001, b"held back") in got
            await conn.aclose()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING):
        run(main)


def test_frames_at_the_limit_pass_and_one_byte_over_is_refused() -> None:
    limit = 150_000

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, echo, max_frame_size=limit)
            conn = await connect(info.url, max_frame_size=limit)
            big = bytes(range(256)) * (limit // 256) + b"x" * (limit % 256)
            await conn.send_frame(1, big)
            assert await conn.receive_frame() == (1, big)
            await conn.send_frame(3, big + b"!")  # refused by the server...
            await conn.send_frame(3, b"after")  # ...which skips it and reads on
            assert await conn.receive_frame() == (0, b"too large")
            assert await conn.receive_frame() == (3, b"after")
            await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_the_client_refuses_oversized_frames_too() -> None:
    async def shout(conn: Any) -> None:
        await conn.send_frame(0, b"x" * 5000)
        await conn.send_frame(0, b"small")
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, shout)
            conn = await connect(info.url, max_frame_size=4096)
            with pytest.raises(_base.FrameTooLarge, match="5000-byte frame on stream 0"):
                await conn.receive_frame()
            assert await conn.receive_frame() == (0, b"small")
            await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize(
    ("trusted", "cert", "reason"),
    [(OTHER_CA, CERT, "unable to get local issuer"), (CA, CA.issue_cert("example.org"), "hostname")],
    ids=["unknown CA", "wrong name"],
)
def test_a_certificate_the_client_does_not_trust_fails_the_handshake(
    trusted: trustme.CA, cert: trustme.LeafCert, reason: str
) -> None:
    settings = quic.QuicSettings(certificate_chain=cert.private_key_and_cert_chain_pem.bytes())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, echo, settings=settings)
            with pytest.raises(trio.BrokenResourceError, match="TLS handshake failed") as failed:
                await connect(info.url, ssl_context=client_context(trusted))
            assert reason in str(failed.value)
            assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
            nursery.cancel_scope.cancel()

    run(main)


def test_nothing_listening_is_broken_at_once() -> None:
    async def main() -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind((LOCAL, 0))
        port = sock.getsockname()[1]
        sock.close()  # the port is free now: the kernel answers with ICMP port unreachable
        with trio.fail_after(2):
            with pytest.raises(trio.BrokenResourceError, match="unreachable"):
                await connect(f"quic://{LOCAL}:{port}")

    run(main)


def test_a_peer_that_vanishes_is_broken_within_the_idle_timeout() -> None:
    # The link is cut by the link emulator, so nothing (not even a close) reaches the client.
    # Virtual time: the clock jumps whenever all tasks wait, so a 6 s timeout takes well under
    # a second, and the bound below is exact rather than padded for a slow machine.
    idle = 6.0
    settings = quic.QuicSettings(idle_timeout=idle)

    async def main() -> None:
        control = LinkControl()
        async with trio.open_nursery() as nursery:
            server_settings = quic.QuicSettings(
                certificate_chain=SERVER.certificate_chain, idle_timeout=idle
            )
            info = await start_server(nursery, echo, settings=server_settings)
            proxy_port = await nursery.start(functools.partial(
                serve_udp_proxy, LOCAL, 0, LOCAL, info.port, LinkProfile(), LinkProfile(),
                control=control))  # fmt: skip
            conn = await connect(f"quic://{LOCAL}:{proxy_port}", settings=settings)
            await conn.send_frame(1, b"ping")
            assert await conn.receive_frame() == (1, b"ping")
            control.cut()
            cut_at = trio.current_time()
            with pytest.raises(trio.BrokenResourceError, match="idle timeout"):
                await conn.receive_frame()
            elapsed = trio.current_time() - cut_at
            assert idle - 0.5 <= elapsed <= idle + 0.1
            with pytest.raises(trio.BrokenResourceError):
                await conn.send_frame(1, b"late")
            await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main, limit=30, clock=trio.testing.MockClock(autojump_threshold=0.05))


def test_a_clean_close_is_end_of_channel_and_a_local_close_is_closed() -> None:
    server_saw: list[str] = []

    async def say_bye(conn: Any) -> None:
        sid, frame = await conn.receive_frame()
        if frame == b"hang up":
            await conn.send_frame(sid, b"bye")
            return  # the transport closes cleanly when the handler returns
        try:
            await conn.receive_frame()
        except trio.EndOfChannel:
            server_saw.append("end")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, say_bye)
            # The server closes:
            conn = await connect(info.url)
            await conn.send_frame(1, b"hang up")
            assert await conn.receive_frame() == (1, b"bye")
            for _ in range(2):
                with pytest.raises(trio.EndOfChannel):
                    await conn.receive_frame()
            with pytest.raises(trio.BrokenResourceError):
                await conn.send_frame(1, b"too late")
            await conn.aclose()
            # The client closes, while one of its tasks waits for a frame:
            conn = await connect(info.url)
            await conn.send_frame(1, b"stay")

            async def wait_for_frame() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await conn.receive_frame()

            async with trio.open_nursery() as waiters:
                waiters.start_soon(wait_for_frame)
                await trio.testing.wait_all_tasks_blocked()
                await conn.aclose()
            await conn.aclose()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await conn.send_frame(1, b"x")
            with pytest.raises(trio.ClosedResourceError):
                await conn.receive_frame()
            with trio.fail_after(2):
                while not server_saw:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert server_saw == ["end"]

    run(main)


def test_a_handler_that_fails_breaks_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def fragile(conn: Any) -> None:
        while True:
            sid, frame = await conn.receive_frame()
            if frame == b"boom":
                raise RuntimeError("handler bug")
            await conn.send_frame(sid, frame)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, fragile)
            victim, bystander = await connect(info.url), await connect(info.url)
            await victim.send_frame(1, b"boom")
            with pytest.raises(trio.BrokenResourceError, match="handler failed"):
                await victim.receive_frame()
            await bystander.send_frame(1, b"still here")
            assert await bystander.receive_frame() == (1, b"still here")
            for conn in (victim, bystander):
                await conn.aclose()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR):
        run(main)
    assert "handler failed" in caplog.text


def test_many_concurrent_connections() -> None:
    clients = 24

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, echo)

            async def client(n: int) -> None:
                conn = await connect(info.url)
                for sid in (1, 3):
                    await conn.send_frame(sid, b"client %d" % n)
                got = {await conn.receive_frame(), await conn.receive_frame()}
                assert got == {(1, b"client %d" % n), (3, b"client %d" % n)}
                await conn.aclose()

            async with trio.open_nursery() as crowd:
                for n in range(clients):
                    crowd.start_soon(client, n)
            nursery.cancel_scope.cancel()

    run(main, limit=15)


def test_a_reader_that_stalls_slows_the_sender_and_loses_nothing() -> None:
    frames, size = 120, 4096
    resume = trio.Event()
    received: list[bytes] = []
    server_settings = quic.QuicSettings(certificate_chain=SERVER.certificate_chain, frame_queue=4)

    async def slow_reader(conn: Any) -> None:
        await resume.wait()
        while len(received) < frames:
            received.append((await conn.receive_frame())[1])
        await conn.send_frame(0, b"got all")
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            info = await start_server(nursery, slow_reader, settings=server_settings)
            conn = await connect(info.url, settings=quic.QuicSettings(send_buffer=64 * 1024))
            payloads = [bytes([i]) * size for i in range(frames)]
            sent = 0
            with trio.move_on_after(0.5):
                for payload in payloads:
                    await conn.send_frame(1, payload)
                    sent += 1
            assert sent < frames  # the sender was held back, not buffered without bound
            resume.set()
            for payload in payloads[sent:]:
                await conn.send_frame(1, payload)
            assert await conn.receive_frame() == (0, b"got all")
            await conn.aclose()
            nursery.cancel_scope.cancel()
        assert received == [bytes([i]) * size for i in range(frames)]

    run(main, limit=15)


class _WireEnd:
    """One side's socket on the in-memory wire: it never blocks."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send

    def send_nowait(self, data: bytes, addr: Any) -> bool:
        self._send(data)
        return True

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()


class _Wire:
    """A client and a server ``QuicFrameConnection`` joined in memory, without sockets, so a
    test decides exactly which datagrams reach the client and when. ``pump`` delivers them, in
    bursts as a socket's reader does."""

    def __init__(self, client_settings: quic.QuicSettings) -> None:
        from aioquic.buffer import Buffer
        from aioquic.quic.connection import QuicConnection
        from aioquic.quic.packet import pull_quic_header

        self.server_addr, self.client_addr = (LOCAL, 4433), (LOCAL, 50000)
        client_quic = QuicConnection(configuration=_quic_config.client_configuration(
            client_settings, client_context(), LOCAL))  # fmt: skip
        client_quic.connect(self.server_addr, now=trio.current_time())
        first, _ = client_quic.datagrams_to_send(now=trio.current_time())[0]
        server_config = _quic_config.server_configuration(SERVER, None)
        header = pull_quic_header(Buffer(data=first), host_cid_length=server_config.connection_id_length)
        server_quic = QuicConnection(
            configuration=server_config, original_destination_connection_id=header.destination_cid
        )
        self.held: list[bytes] | None = None  # server -> client datagrams held back, when a list
        self._for_client: list[bytes] = []
        self._for_server: list[bytes] = [first]
        self._moved = trio.Event()
        self.client = quic.QuicFrameConnection(
            client_quic, _WireEnd(self._to_server), settings=client_settings,
            max_frame_size=1 << 20, peer="client")  # fmt: skip
        self.server = quic.QuicFrameConnection(
            server_quic, _WireEnd(self._to_client), settings=SERVER, max_frame_size=1 << 20, peer="server"
        )

    def _to_server(self, data: bytes) -> None:
        self._for_server.append(data)
        self._moved.set()

    def _to_client(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        else:
            self._for_client.append(data)
            self._moved.set()

    def deliver(self, conn: Any, datagrams: list[bytes], addr: Any) -> None:
        for data in datagrams:
            conn.datagram_received(data, addr)
        conn.datagrams_arrived()

    async def pump(self) -> None:
        while True:
            if self._for_server:
                batch, self._for_server = self._for_server, []
                self.deliver(self.server, batch, self.client_addr)
            if self._for_client:
                batch, self._for_client = self._for_client, []
                self.deliver(self.client, batch, self.server_addr)
            if not (self._for_server or self._for_client):
                await self._moved.wait()
                self._moved = trio.Event()


@pytest.mark.parametrize("frame_queue", [64, 1], ids=["room in the channel", "channel of one"])
def test_datagrams_that_arrive_together_are_all_taken_in(frame_queue: int) -> None:
    # On a busy machine several datagrams reach a connection before it runs. It used to take in
    # only the first one that carried a frame, then sleep with the rest queued: their wake-ups
    # were spent. Nothing but a new datagram woke it, and the peer, whose packets
    # went unacknowledged, sent less and less (each probe timeout doubles), so an answer at 1 ms
    # per token stalled for tens of seconds (and the delayed acks made its RTT estimate seconds).
    # Here the server's datagrams are held back and handed to the client in one burst, then no
    # datagram ever arrives again: every frame in the burst must come out, with no timer needed.
    frames = 40

    async def main() -> None:
        wire = _Wire(quic.QuicSettings(frame_queue=frame_queue))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire.pump)
            nursery.start_soon(wire.client.run)
            nursery.start_soon(wire.server.run)
            await wire.client.wait_connected()
            await wire.client.send_frame(1, b"go")
            assert await wire.server.wait_handshake()
            assert await wire.server.receive_frame() == (1, b"go")
            await trio.testing.wait_all_tasks_blocked()
            wire.held = []
            for i in range(frames):
                await wire.server.send_frame(1, b"token %d" % i)
            await trio.testing.wait_all_tasks_blocked()  # the server sent all it will for now
            burst, wire.held = wire.held, []  # from here on the client hears nothing more
            assert len(burst) >= frames // 2  # (a packet per frame, unless paced together)
            wire.deliver(wire.client, burst, wire.server_addr)
            with trio.fail_after(5):  # ~1 ms when right; forever (the idle timeout) when not
                for i in range(frames):
                    assert await wire.client.receive_frame() == (1, b"token %d" % i)
            nursery.cancel_scope.cancel()

    run(main)


# ----- TLS settings -------------------------------------------------------------------------------


def test_ssl_context_settings_map_onto_the_quic_configuration() -> None:
    ctx = client_context()
    config = _quic_config.client_configuration(quic.QuicSettings(), ctx, "host.example")
    assert config.verify_mode == ssl.CERT_REQUIRED and config.server_name == "host.example"
    assert config.cadata is not None and CA.cert_pem.bytes().strip() in config.cadata
    assert config.alpn_protocols == ["pydisco/1"] and config.is_client

    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    config = _quic_config.client_configuration(quic.QuicSettings(), ctx, "host.example")
    assert config.verify_mode == ssl.CERT_NONE and config.server_name is None

    settings = quic.QuicSettings(verify_peer=True, server_name="other", ca_certificates=b"PEM")
    config = _quic_config.client_configuration(settings, ctx, "host.example")
    assert (config.verify_mode, config.server_name, config.cadata) == (ssl.CERT_REQUIRED, "other", b"PEM")


def test_a_server_without_its_key_says_how_to_give_it() -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CERT.configure_cert(ctx)  # loaded into OpenSSL, where QUIC cannot read it back
    with pytest.raises(ConfigurationError, match="server_ssl_context"):
        _quic_config.server_configuration(quic.QuicSettings(), ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    with pytest.raises(ConfigurationError, match="client certificates"):
        _quic_config.server_configuration(SERVER, ctx)


def test_a_server_context_from_pydisco_tls_carries_its_key() -> None:
    from pydisco.cloud import self_signed, server_ssl_context

    config = _quic_config.server_configuration(
        quic.QuicSettings(), server_ssl_context(self_signed([LOCAL]))
    )
    assert config.certificate is not None and config.private_key is not None
