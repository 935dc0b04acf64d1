"""CloudEndpoint against a real server with a stub backend, and against scripted fake servers
(written with the sans-IO ServerProtocol) for the faults a real server will not produce on cue.
Most run in virtual time over the in-memory transport."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
import trio

from cloud_support import (
    TOKEN,
    StubBackend,
    client_context,
    running_server,
    start_server,
    text_of,
    transports,
    trio_test,
    wait_until,
)
from transport_schemes import SCHEMES
from pydisco.cloud import protocol as P
from pydisco.cloud import open_cloud_endpoint
from pydisco._errors import (
    AuthenticationError,
    ConfigurationError,
    EndpointError,
    EndpointUnavailable,
    PromptTooLongError,
)
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink


def ask(n: int = 5, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt="x", max_tokens=n, **kw)  # type: ignore[arg-type]


# -- measurements ---------------------------------------------------------------------------


@trio_test(60, mock_clock=True)
async def test_ttft_and_inter_token_times_are_measured_and_resumes_do_not_count_as_ttft() -> None:
    backend = StubBackend(period=0.02, first_delay=0.25)
    async with running_server(backend, ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            await cloud.generate(ask(5), got.append)
            backend.first_delay = 0.5
            await cloud.generate(ask(5), got.append)
            await cloud.generate(ask(8, resume_token_ids=(1, 2, 3)), got.append)  # resumed: gaps only
            stats = cloud.statistics()
    assert stats.ttft_samples == pytest.approx((0.25, 0.5))
    assert stats.ttft_p50 == pytest.approx(0.375)
    assert len(stats.inter_token_samples) == 4 + 4 + 4
    assert stats.inter_token_samples == pytest.approx((0.02,) * 12)
    assert stats.inter_token_p99 == pytest.approx(0.02)
    assert stats.tokens == 15 and stats.requests == stats.completed == 3 and stats.connects == 1
    assert [p.position for p in got[-5:]] == [3, 4, 5, 6, 7]


# -- cancellation -------------------------------------------------------------------------


@trio_test(60, mock_clock=True)
async def test_cancellation_sends_cancel_returns_quickly_and_keeps_the_link() -> None:
    backend = StubBackend(period=0.1)
    async with running_server(backend, ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            with trio.move_on_after(0.35) as scope:
                await cloud.generate(ask(100), got.append)
            assert scope.cancelled_caught
            cancelled_at = trio.current_time()
            await wait_until(lambda: backend.cancelled == 1)
            assert trio.current_time() - cancelled_at < 0.1  # the server stopped at once
            assert server.statistics().streams_cancelled == 1
            assert len(got) == 4 and backend.produced == 4
            await cloud.generate(ask(3), got.append)  # same link, still good
            stats = cloud.statistics()
    assert stats.cancelled == 1 and stats.completed == 1 and stats.connects == 1


@trio_test(60, mock_clock=True)
async def test_a_failing_sink_ends_its_answer_cancels_it_on_the_server_and_keeps_the_link() -> None:
    backend = StubBackend(period=0.1)
    async with running_server(backend, ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:

            def sink(piece: TokenPiece) -> None:
                if piece.position == 2:
                    raise ValueError("the application choked")

            with pytest.raises(ValueError, match="choked"):
                await cloud.generate(ask(100), sink)
            await wait_until(lambda: backend.cancelled == 1)
            assert backend.produced == 3
            await cloud.generate(ask(2), lambda p: None)
            assert cloud.statistics().connects == 1


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(60)
async def test_many_answers_on_one_link_recycle_their_streams(scheme: str) -> None:
    # More answers than QUIC's initial stream credit (128): streams must be ended when done.
    async with running_server(StubBackend(period=0), [scheme]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
            for i in range(140):
                with trio.fail_after(5):
                    await cloud.generate(ask(1), lambda p: None)
                if i % 10 == 0:  # and a few cancelled ones, which end their streams too
                    with trio.move_on_after(0):
                        await cloud.generate(ask(1), lambda p: None)
            assert cloud.statistics().connects == 1


# -- errors from a real server --------------------------------------------------------------


class FailingBackend:
    model_id = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        await trio.lowlevel.checkpoint()
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PromptTooLongError("too long"), "prompt_too_long"),
        (ConfigurationError("nope"), "bad_request"),
        (EndpointError("upstream down", code="upstream_unavailable"), "upstream_unavailable"),
        (EndpointError("odd", code="not-a-known-code"), "internal"),
        (RuntimeError("bug"), "internal"),
    ],
)
@trio_test(30, mock_clock=True)
async def test_backend_failures_reach_the_client_as_codes_and_the_link_survives(error: Exception, code: str) -> None:
    async with running_server(FailingBackend(error), ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            for _ in range(2):
                with pytest.raises(EndpointError) as info:
                    await cloud.generate(ask(), lambda p: None)
                assert info.value.code == code and not isinstance(info.value, EndpointUnavailable)
            assert cloud.statistics().connects == 1
        assert server.statistics().streams_failed == 2


@trio_test(30, mock_clock=True)
async def test_a_full_queue_answers_overloaded() -> None:
    async with running_server(StubBackend(period=0.1), ["memory"], parallel=1, max_queue=0) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cloud.generate, ask(10), lambda p: None)
                await wait_until(lambda: server.statistics().running == 1)
                with pytest.raises(EndpointError) as info:
                    await cloud.generate(ask(), lambda p: None)
    assert info.value.code == "overloaded"


@trio_test(30, mock_clock=True)
async def test_the_per_connection_stream_limit_refuses_only_the_extra_stream() -> None:
    async with running_server(StubBackend(period=0.1), ["memory"], max_streams_per_connection=1) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cloud.generate, ask(10), lambda p: None)
                await wait_until(lambda: server.statistics().running == 1)
                with pytest.raises(EndpointError) as info:
                    await cloud.generate(ask(), lambda p: None)
            assert info.value.code == "too_many_streams"
            assert cloud.statistics().completed == 1


@trio_test(30, mock_clock=True)
async def test_a_server_shutdown_is_endpoint_unavailable_with_the_tokens_kept() -> None:
    got: list[TokenPiece] = []
    async with trio.open_nursery() as nursery:
        server, life = await start_server(nursery, StubBackend(period=0.1), ["memory"])
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:

            async def stop_after_three() -> None:
                await wait_until(lambda: len(got) == 3)
                life.cancel()

            nursery.start_soon(stop_after_three)
            with pytest.raises(EndpointUnavailable) as info:
                await cloud.generate(ask(50), got.append)
    assert info.value.code == "shutting_down" and "after 3 tokens" in str(info.value)
    assert text_of(got) == "t0 t1 t2 "


@trio_test(30)
async def test_nothing_listening_is_endpoint_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with open_cloud_endpoint(f"ws://127.0.0.1:{port}", token=TOKEN) as cloud:
        with pytest.raises(EndpointUnavailable):
            await cloud.generate(ask(), lambda p: None)
        assert cloud.statistics().connect_failures == 1


def test_an_unknown_scheme_is_a_configuration_error() -> None:
    async def main() -> None:
        async with open_cloud_endpoint("pigeon://coop:1", token=TOKEN) as cloud:
            await cloud.generate(ask(), lambda p: None)

    with pytest.raises(ConfigurationError, match="known schemes"):
        trio.run(main)


# -- scripted fake servers ----------------------------------------------------------------


Script = Callable[[transports.FrameConnection, P.ServerProtocol, int, GenerationRequest], Awaitable[None]]


class FakeLink:
    """What the scripted server's replies on stream 0 (welcome, auth_ok, pongs) wait: a link
    with this round trip, as far as the client's measurement can tell. Change it at will."""

    def __init__(self, rtt: float = 0.0) -> None:
        self.rtt = rtt
        self.pings = 0  # pings the client sent


async def fake_server(nursery: trio.Nursery, script: Script, name: str = "fake", link: FakeLink | None = None) -> str:
    """A memory server that handshakes for real, then runs ``script`` for each generate."""
    link = link or FakeLink()

    async def handle(connection: transports.FrameConnection) -> None:
        proto = P.ServerProtocol(check_token=lambda t: t == TOKEN, model="fake", max_frame_size=1 << 20,
                                 max_streams=4, heartbeat_interval=60)  # fmt: skip
        while True:
            try:
                sid, data = await connection.receive_frame()
            except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if sid == P.CONNECTION_STREAM and isinstance(P.decode(data), P.Ping):
                link.pings += 1
            for out in proto.receive(sid, data):
                if isinstance(out, P.Send):
                    if out.stream_id == P.CONNECTION_STREAM:
                        await trio.sleep(link.rtt)
                    await connection.send_frame(out.stream_id, out.data)
                elif isinstance(out, P.StartStream):
                    await script(connection, proto, out.stream_id, out.request)

    info: transports.ListenerInfo = await nursery.start(transports.serve, handle, f"memory://{name}:0")
    return info.url


@trio_test(30, mock_clock=True)
async def test_a_link_lost_mid_answer_keeps_the_tokens_and_the_next_answer_reconnects() -> None:
    lives = []

    async def die_after_three(conn: transports.FrameConnection, proto: P.ServerProtocol, sid: int,
                              request: GenerationRequest) -> None:  # fmt: skip
        lives.append(sid)
        for i in range(3 if len(lives) == 1 else request.max_tokens):
            await conn.send_frame(sid, proto.token(sid, TokenPiece(i, i, f"<{i}>"), 0, 0) or b"")
        if len(lives) == 1:
            conn.abort()  # type: ignore[attr-defined]  # the memory transport's link drop
        else:
            await conn.send_frame(sid, proto.done(sid, GenerationResult("length", 1, 1, request.max_tokens), 0) or b"")

    async with trio.open_nursery() as nursery:
        url = await fake_server(nursery, die_after_three)
        async with open_cloud_endpoint(url, token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            with pytest.raises(EndpointUnavailable) as info:
                await cloud.generate(ask(10), got.append)
            assert "after 3 tokens" in str(info.value)
            assert text_of(got) == "<0><1><2>"
            result = await cloud.generate(ask(2), got.append)
            stats = cloud.statistics()
        nursery.cancel_scope.cancel()
    assert result.finish_reason == "length" and text_of(got) == "<0><1><2><0><1>"
    assert stats.connects == 2 and stats.links_lost == 1 and stats.failed == 1


QUEUED_NS = 50_000_000  # the scripted server's own queueing of each token: ts - tg


async def tokens_queued_50ms(conn: transports.FrameConnection, proto: P.ServerProtocol, sid: int,
                             request: GenerationRequest) -> None:  # fmt: skip
    for i in range(request.max_tokens):
        generated = 10**12 + i  # the server's clock: meaningless to the client, only ts - tg counts
        await conn.send_frame(sid, proto.token(sid, TokenPiece(i, i, "x"), generated, generated + QUEUED_NS) or b"")
    await conn.send_frame(sid, proto.done(sid, GenerationResult("length", 1, 1, request.max_tokens), 0) or b"")


@trio_test(60, mock_clock=True)
async def test_token_ages_are_server_queueing_plus_half_the_measured_round_trip() -> None:
    link = FakeLink(rtt=0.2)
    async with trio.open_nursery() as nursery:
        url = await fake_server(nursery, tokens_queued_50ms, link=link)
        async with open_cloud_endpoint(url, token=TOKEN, ping_after=1.0, dead_after=5.0) as cloud:
            assert cloud.statistics().rtt_s is None  # no link yet
            got: list[TokenPiece] = []
            await cloud.generate(ask(3), got.append)
            assert cloud.statistics().rtt_s == pytest.approx(0.2)  # hello sent -> welcome received
            assert [p.age_ns for p in got] == [QUEUED_NS + 100_000_000] * 3
            link.rtt = 0.6
            await trio.sleep(2.0)  # quiet for ping_after: one ping, its pong 0.6 s later
            assert cloud.statistics().rtt_s == pytest.approx(0.2 + (0.6 - 0.2) / 8)  # smoothed
            got.clear()
            await cloud.generate(ask(2), got.append)
            assert [p.age_ns for p in got] == [QUEUED_NS + 125_000_000] * 2
        nursery.cancel_scope.cancel()


@trio_test(30)
async def test_a_real_server_gives_small_non_negative_ages() -> None:
    async with running_server(StubBackend(period=0.001), ["ws"]) as server:
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            await cloud.generate(ask(20), got.append)
            rtt = cloud.statistics().rtt_s
    assert rtt is not None and 0 < rtt < 1.0
    assert len(got) == 20 and all(0 <= p.age_ns < 1_000_000_000 for p in got)
    assert all(p.age_ns >= int(rtt * 0.5e9) for p in got)  # at least the one-way delay


@trio_test(60, mock_clock=True)
async def test_a_quiet_link_is_pinged_whatever_the_time_of_its_last_frame() -> None:
    # The last frame arrives at 0.4 s. Woken at 0.4 + 1.0, the watcher used to compute the
    # silence as 1.4 - 0.4, which rounds to just under 1.0: no ping, and a sleep until a
    # deadline already past, spinning for ever (under a mock clock time then never moves).
    link = FakeLink(rtt=0.2)
    async with trio.open_nursery() as nursery:
        url = await fake_server(nursery, tokens_queued_50ms, link=link)
        async with open_cloud_endpoint(url, token=TOKEN, ping_after=1.0, dead_after=5.0) as cloud:
            await cloud.generate(ask(1), lambda piece: None)
            assert trio.current_time() == pytest.approx(0.4)
            await trio.sleep(1.1)
            assert link.pings == 1
        nursery.cancel_scope.cancel()


@trio_test(60, mock_clock=True)
async def test_a_silent_server_is_detected_by_heartbeat() -> None:
    async def go_silent(conn: transports.FrameConnection, proto: P.ServerProtocol, sid: int,
                        request: GenerationRequest) -> None:  # fmt: skip
        await trio.sleep_forever()  # the reader stops too: pings go unanswered

    async with trio.open_nursery() as nursery:
        url = await fake_server(nursery, go_silent)
        async with open_cloud_endpoint(url, token=TOKEN, ping_after=1.0, dead_after=5.0) as cloud:
            start = trio.current_time()
            with pytest.raises(EndpointUnavailable) as info:
                await cloud.generate(ask(), lambda p: None)
            waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert info.value.code == "timeout"
    assert 5.0 <= waited <= 6.5


@trio_test(30, mock_clock=True)
async def test_a_server_that_breaks_the_protocol_is_an_endpoint_error() -> None:
    async def skip_a_position(conn: transports.FrameConnection, proto: P.ServerProtocol, sid: int,
                              request: GenerationRequest) -> None:  # fmt: skip
        await conn.send_frame(sid, proto.token(sid, TokenPiece(0, 0, "a"), 0, 0) or b"")
        await conn.send_frame(sid, proto.token(sid, TokenPiece(2, 0, "c"), 0, 0) or b"")

    async with trio.open_nursery() as nursery:
        url = await fake_server(nursery, skip_a_position)
        async with open_cloud_endpoint(url, token=TOKEN) as cloud:
            got: list[TokenPiece] = []
            with pytest.raises(EndpointError) as info:
                await cloud.generate(ask(), got.append)
        nursery.cancel_scope.cancel()
    assert info.value.code == "bad_frame" and "expected 1" in str(info.value)
    assert text_of(got) == "a"


@trio_test(30, mock_clock=True)
async def test_wrong_credentials_are_an_authentication_error() -> None:
    async with running_server(StubBackend(), ["memory"]) as server:
        async with open_cloud_endpoint(server.urls[0], token="not-it") as cloud:
            with pytest.raises(AuthenticationError):
                await cloud.generate(ask(), lambda p: None)
            stats = cloud.statistics()
        assert server.statistics().auth_failures == 1
    assert stats.connects == 0 and stats.connect_failures == 1


# -- the server's own timers ----------------------------------------------------------------


@trio_test(300, mock_clock=True)
async def test_server_closes_silent_connections_but_keeps_clients_that_answer_pings() -> None:
    async with running_server(StubBackend(), ["memory"], heartbeat_interval=5, idle_timeout=12,
                              handshake_timeout=3) as server:  # fmt: skip
        url = server.urls[0]
        mute = await transports.connect(url)  # connects and never says hello
        lurker = await transports.connect(url)  # handshakes, then ignores pings
        for data in P.ClientProtocol(token=TOKEN).handshake():
            await lurker.send_frame(0, data)
        async with open_cloud_endpoint(url, token=TOKEN, ping_after=100, dead_after=200) as cloud:
            await cloud.generate(ask(2), lambda p: None)
            await trio.sleep(60)  # idle, but the endpoint answers the server's pings
            await cloud.generate(ask(2), lambda p: None)
            assert cloud.statistics().connects == 1

        async def errors(conn: transports.FrameConnection) -> list[str]:
            frames = []
            while True:
                try:
                    _, data = await conn.receive_frame()
                except (trio.EndOfChannel, trio.BrokenResourceError):
                    return [f.code for f in frames if isinstance(f, P.Error)]
                frames.append(P.decode(data))

        assert await errors(mute) == ["timeout"]
        assert await errors(lurker) == ["timeout"]
        assert server.statistics().protocol_errors == 2
