"""Natural batching (protocol version 3): tokens ready at once share a frame, frames ready at
once share a write; order and positions are kept, and an older peer still gets one frame per
token."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pydisco import transports
from pydisco.cloud import protocol as P
from pydisco._types import GenerationRequest, GenerationResult, TokenPiece, TokenSink

from cloud_support import TOKEN, StubBackend, client_context, running_server, server_tls, tokens_of, trio_test

SCHEMES = ["memory", "ws", "wss", "quic"]


def authed_server(versions: tuple[int, ...], max_frame_size: int = 1 << 20) -> P.ServerProtocol:
    server = P.ServerProtocol(check_token=lambda t: t == "good", model="m", max_frame_size=max_frame_size,
                              max_streams=4, heartbeat_interval=1.0)  # fmt: skip
    server.receive(0, P.encode(P.Hello(versions)))
    server.receive(0, P.encode(P.Auth("good")))
    assert server.state is P.ServerState.READY
    return server


def ready_client(version: int, versions: tuple[int, ...] = P.PROTOCOL_VERSIONS) -> P.ClientProtocol:
    client = P.ClientProtocol(token="good", versions=versions)
    client.handshake()
    client.receive(0, P.encode(P.Welcome(version, "m", 1 << 20, 4, 5.0)))
    client.receive(0, P.encode(P.AuthOk()))
    assert client.state is P.ClientState.READY
    return client


pieces_strategy = st.lists(st.tuples(st.integers(-1, 2**31 - 1), st.text(max_size=12), st.integers(0, 2**63 - 1)),
                           min_size=1, max_size=600)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(start=st.integers(0, 1000), tokens=pieces_strategy, version=st.sampled_from([1, 2, 3]),
       max_frame=st.sampled_from([1024, 4096, 1 << 20]))  # fmt: skip
def test_batched_frames_decode_to_the_same_tokens_in_order(start: int, tokens: list[tuple[int, str, int]],
                                                           version: int, max_frame: int) -> None:  # fmt: skip
    server = authed_server(tuple(range(1, version + 1)), max_frame)
    client = ready_client(version)
    sid, request = client.open_stream(GenerationRequest(prompt="hi", max_tokens=10_000, resume_position=start))
    server.receive(sid, request)
    pieces = [TokenPiece(start + i, tid, text) for i, (tid, text, _) in enumerate(tokens)]
    times = [t for _, _, t in tokens]
    frames = server.tokens(sid, pieces, times, 42)
    for data in frames:
        assert len(data) <= max_frame  # a batch never outgrows what a receiver takes
    received = [out for data in frames for out in client.receive(sid, data)]
    assert received == [P.TokenReceived(sid, p, t, 42) for p, t in zip(pieces, times)]
    if version < P.TOKENS_VERSION:
        assert len(frames) == len(pieces)  # an older client gets one token frame each
    elif len(pieces) > 1:
        assert len(frames) < len(pieces)
    # The stream goes on at the next position: a single token, then done.
    nxt = TokenPiece(start + len(pieces), 7, "x")
    [one] = server.tokens(sid, [nxt], [1], 43)
    assert P.decode(one) == P.Token(nxt, 1, 43)
    assert client.receive(sid, one) == [P.TokenReceived(sid, nxt, 1, 43)]


@st.composite
def tokens_frames(draw: st.DrawFn) -> P.Tokens:
    start = draw(st.integers(0, 2**31 - 5000))
    items = draw(st.lists(st.tuples(st.integers(-1, 2**31 - 1), st.text(max_size=8), st.integers(0, 2**63 - 1)),
                          min_size=1, max_size=40))  # fmt: skip
    pieces = tuple(TokenPiece(start + i, tid, text) for i, (tid, text, _) in enumerate(items))
    return P.Tokens(pieces, tuple(t for _, _, t in items), draw(st.integers(0, 2**63 - 1)))


@settings(max_examples=200, deadline=None)
@given(tokens_frames(), st.data())
def test_a_tokens_frame_survives_a_round_trip_and_its_truncations_never_crash(frame: P.Tokens,
                                                                              data: st.DataObject) -> None:  # fmt: skip
    wire = P.encode(frame)
    assert P.decode(wire) == frame
    cut = data.draw(st.integers(0, len(wire) - 1))
    try:
        P.decode(wire[:cut])
    except P.ProtocolError:
        pass


def test_tokens_frames_are_checked_like_token_frames() -> None:
    client = ready_client(3)
    sid, _ = client.open_stream(GenerationRequest(prompt="hi", max_tokens=8))
    gap = P.Tokens((TokenPiece(1, 1, "a"), TokenPiece(2, 2, "b")), (0, 0))
    [close] = client.receive(sid, P.encode(gap))  # position 0 was never sent
    assert isinstance(close, P.CloseConnection) and close.code == P.Code.BAD_FRAME
    old = ready_client(2)
    sid, _ = old.open_stream(GenerationRequest(prompt="hi", max_tokens=8))
    batch = P.Tokens((TokenPiece(0, 1, "a"), TokenPiece(1, 2, "b")), (0, 0))
    [close] = old.receive(sid, P.encode(batch))  # a version 2 connection has no tokens frame
    assert isinstance(close, P.CloseConnection) and close.code == P.Code.BAD_FRAME


@pytest.mark.parametrize("fields", [
    {"pos": 0, "ids": [], "text": [], "tg": []},
    {"pos": 0, "ids": [1, 2], "text": ["a"], "tg": [0, 0]},
    {"pos": 0, "ids": [1, True], "text": ["a", "b"], "tg": [0, 0]},
    {"pos": 0, "ids": [1, 2], "text": ["a", 3], "tg": [0, 0]},
    {"pos": 0, "ids": [1, 2], "text": ["a", "b"], "tg": [0, -1]},
    {"pos": 2**31 - 1, "ids": [1, 2], "text": ["a", "b"], "tg": [0, 0]},
    {"pos": 0, "ids": "12", "text": ["a", "b"], "tg": [0, 0]},
])  # fmt: skip
def test_malformed_tokens_frames_are_bad_frames(fields: dict[str, object]) -> None:
    import msgpack  # type: ignore[import-untyped]

    with pytest.raises(P.ProtocolError) as caught:
        P.decode(msgpack.packb({"t": "tokens", **fields}))
    assert caught.value.code == P.Code.BAD_FRAME


def test_tokens_frames_must_hold_consecutive_positions() -> None:
    with pytest.raises(ValueError):
        P.Tokens((TokenPiece(0, 1, "a"), TokenPiece(2, 2, "b")), (0, 0))
    server = authed_server((1, 2, 3))
    server.receive(1, P.encode(P.Generate(GenerationRequest(prompt="hi", max_tokens=8))))
    client = ready_client(3)
    sid, _ = client.open_stream(GenerationRequest(prompt="hi", max_tokens=8))
    # A backend that skips a position gets two frames, not a malformed one.
    frames = server.tokens(1, [TokenPiece(0, 1, "a"), TokenPiece(1, 1, "b"), TokenPiece(5, 2, "c")], [0, 0, 0], 0)
    assert len(frames) == 2


# -- over real transports -----------------------------------------------------------------


class BurstBackend:
    """Each answer: ``max_tokens`` tokens all at once (no checkpoint between them), as a batched
    engine's step hands out tokens for many streams, then the next burst after a tick."""

    model_id = "burst"

    def __init__(self, bursts: int = 3) -> None:
        self.bursts = bursts

    async def generate(self, request: GenerationRequest, sink: TokenSink) -> GenerationResult:
        per = request.max_tokens // self.bursts
        position = 0
        for b in range(self.bursts):
            count = per if b < self.bursts - 1 else request.max_tokens - position
            for _ in range(count):
                sink(TokenPiece(position, position * 7 % 1000, f"w{position} "))
                position += 1
            await trio.sleep(0.01)
        return GenerationResult("length", 1, 1, position)


async def _answer(url: str, scheme: str, versions: tuple[int, ...], count: int) -> tuple[list[TokenPiece], int, int]:
    """(pieces, frames on the answer's stream, negotiated version) for one raw answer."""
    connection = await transports.connect(url, ssl_context=client_context(scheme))
    try:
        proto = P.ClientProtocol(token=TOKEN, versions=versions)
        for data in proto.handshake():
            await connection.send_frame(0, data)
        while proto.state is P.ClientState.HANDSHAKE:
            sid, data = await connection.receive_frame()
            proto.receive(sid, data)
        assert proto.welcome is not None
        sid, data = proto.open_stream(GenerationRequest(prompt="burst", max_tokens=count))
        await connection.send_frame(sid, data)
        pieces: list[TokenPiece] = []
        frames = 0
        while True:
            got_sid, data = await connection.receive_frame()
            if got_sid != sid:
                continue
            frames += 1
            outs = proto.receive(got_sid, data)
            pieces.extend(o.piece for o in outs if isinstance(o, P.TokenReceived))
            if any(isinstance(o, (P.StreamDone, P.StreamFailed, P.CloseConnection)) for o in outs):
                assert isinstance(outs[-1], P.StreamDone), outs
                return pieces, frames, proto.welcome.version
    finally:
        await connection.aclose()


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(timeout=60)
async def test_a_burst_arrives_in_fewer_frames_and_identical_to_unbatched(scheme: str) -> None:
    count = 90
    async with running_server(BurstBackend(), [scheme]) as server:
        batched, batched_frames, v_new = await _answer(server.urls[0], scheme, P.PROTOCOL_VERSIONS, count)
        single, single_frames, v_old = await _answer(server.urls[0], scheme, (1, 2), count)
    assert (v_new, v_old) == (P.TOKENS_VERSION, 2)
    assert tokens_of(batched) == tokens_of(single) == tuple((k, k * 7 % 1000, f"w{k} ") for k in range(count))
    assert single_frames == count + 1  # a version 2 client: one token frame each, then done
    assert batched_frames <= 3 * 2 + 1  # each burst in a frame or two (the first may go alone), then done


@trio_test(timeout=120)
async def test_quic_and_websocket_give_identical_token_streams() -> None:
    seen: dict[str, list[tuple[tuple[int, int, str], ...]]] = {}
    from pydisco.cloud import open_cloud_endpoint

    for scheme in ("ws", "wss", "quic"):
        async with running_server(StubBackend(period=0.0005), [scheme], max_streams_per_connection=8) as server:
            async with open_cloud_endpoint(server.urls[0], token=TOKEN, ssl_context=client_context(scheme)) as cloud:
                results: dict[int, list[TokenPiece]] = {}

                async def one(k: int) -> None:
                    results[k] = []
                    await cloud.generate(GenerationRequest(prompt=f"p{k}", max_tokens=40 + k), results[k].append)

                async with trio.open_nursery() as nursery:
                    for k in range(6):
                        nursery.start_soon(one, k)
        seen[scheme] = [tokens_of(results[k]) for k in range(6)]
    assert seen["ws"] == seen["wss"] == seen["quic"]
    assert seen["ws"][5] == tuple((p, p, f"t{p} ") for p in range(45))


@trio_test(timeout=30)
async def test_websocket_sends_a_batch_of_frames_in_one_write() -> None:
    async with running_server(StubBackend(), ["ws"]) as server:
        connection = await transports.connect(server.urls[0])
        try:
            ws = connection._ws  # type: ignore[attr-defined]
            assert connection._batches  # type: ignore[attr-defined]  # a trio-websocket change would turn it off
            writes = 0
            send_all = ws._stream.send_all

            async def counting(data: bytes) -> None:
                nonlocal writes
                writes += 1
                await send_all(data)

            ws._stream.send_all = counting
            proto = P.ClientProtocol(token=TOKEN)
            pings = [proto.ping()[1] for _ in range(3)]
            await transports.send_frames(connection, [(0, f) for f in [*proto.handshake(), *pings]])
            assert writes == 1
            got: list[str] = []
            while len(got) < 5:
                sid, data = await connection.receive_frame()
                got.append(type(P.decode(data)).__name__)
            assert got == ["Welcome", "AuthOk", "Pong", "Pong", "Pong"]  # each frame its own message, in order
        finally:
            await connection.aclose()


@trio_test(timeout=30)
async def test_quic_packs_a_batch_of_frames_into_fewer_datagrams() -> None:
    async with running_server(StubBackend(), ["quic"]) as server:
        connection = await transports.connect(server.urls[0], ssl_context=client_context("quic"))
        try:
            endpoint = connection._socket  # type: ignore[attr-defined]
            sent = 0
            send_nowait = endpoint.send_nowait

            def counting(data: bytes, addr: object) -> bool:
                nonlocal sent
                sent += 1
                return bool(send_nowait(data, addr))

            endpoint.send_nowait = counting
            proto = P.ClientProtocol(token=TOKEN)
            await transports.send_frames(connection, [(0, f) for f in proto.handshake()])
            while proto.state is P.ClientState.HANDSHAKE:
                sid, data = await connection.receive_frame()
                proto.receive(sid, data)
            await trio.sleep(0.1)  # acknowledgements settle
            sent = 0
            await transports.send_frames(connection, [(0, proto.ping()[1]) for _ in range(8)])
            batched = sent
            sent = 0
            for _ in range(8):
                await connection.send_frame(0, proto.ping()[1])
            single = sent
            assert batched == 1 and single >= 4, (batched, single)
            pongs = 0
            while pongs < 16:
                sid, data = await connection.receive_frame()
                pongs += isinstance(P.decode(data), P.Pong)
        finally:
            await connection.aclose()


@trio_test(timeout=30)
async def test_a_quic_receiver_acknowledges_a_paced_stream_far_less_than_once_per_datagram() -> None:
    from pydisco.transports.quic import QuicSettings

    async def pacer(connection: transports.FrameConnection) -> None:
        sid, _ = await connection.receive_frame()
        for k in range(60):
            await connection.send_frame(sid, b"tick %d" % k)
            await trio.sleep(0.003)  # each frame its own datagram
        await connection.receive_frame()

    assert QuicSettings().ack_delay > 0.001  # not aioquic's own
    with pytest.raises(Exception, match="ack_delay"):
        QuicSettings(ack_delay=0.03)  # beyond the 25 ms announced to the peer
    quic = transports.get_transport("quic")
    async with trio.open_nursery() as nursery:
        info = await nursery.start(lambda task_status: quic.serve(pacer, "127.0.0.1", 0, ssl_context=server_tls(),
                                                                  task_status=task_status))  # fmt: skip
        connection = await transports.connect(info.url, ssl_context=client_context("quic"))
        endpoint = connection._socket  # type: ignore[attr-defined]
        sent = 0
        send_nowait = endpoint.send_nowait

        def counting(data: bytes, addr: object) -> bool:
            nonlocal sent
            sent += 1
            return bool(send_nowait(data, addr))

        await connection.send_frame(1, b"go")
        endpoint.send_nowait = counting
        got = [await connection.receive_frame() for _ in range(60)]
        assert got == [(1, b"tick %d" % k) for k in range(60)]
        assert sent < 30, sent  # with a 1 ms delay nearly every datagram is acknowledged alone
        await connection.send_frame(1, b"bye")
        await connection.aclose()
        nursery.cancel_scope.cancel()


@trio_test(timeout=30)
async def test_freeze_gc_moves_what_the_server_holds_to_the_permanent_generation() -> None:
    import gc

    try:
        before = gc.get_freeze_count()
        async with running_server(StubBackend(), ["memory"], freeze_gc=True):
            assert gc.get_freeze_count() > before
        gc.unfreeze()
        async with running_server(StubBackend(), ["memory"]):
            assert gc.get_freeze_count() == 0  # only when asked
    finally:
        gc.unfreeze()
