"""Every transport meets the contract of transports/_base.py (no model involved)."""

from __future__ import annotations

import importlib

import pytest
import trio

from cloud_support import PLAIN, client_context, listen_url, server_tls, transports, trio_test
from transport_schemes import SCHEMES

LIMIT = 4096


async def echo_until_closed(connection: transports.FrameConnection) -> None:
    """Echo frames; answer an oversized one with a frame on stream 0 and keep going."""
    while True:
        try:
            stream_id, frame = await connection.receive_frame()
        except transports.FrameTooLarge:
            await connection.send_frame(0, b"too large")
            continue
        except (trio.EndOfChannel, trio.BrokenResourceError):
            await connection.aclose()
            return
        if frame == b"close":
            await connection.aclose()
            return
        await connection.send_frame(stream_id, frame)


async def start_echo(nursery: trio.Nursery, scheme: str) -> transports.ListenerInfo:
    ssl_context = None if scheme in PLAIN else server_tls()
    info: transports.ListenerInfo = await nursery.start(
        lambda task_status: transports.serve(
            echo_until_closed, listen_url(scheme), ssl_context=ssl_context, max_frame_size=LIMIT, task_status=task_status
        )
    )
    return info


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(15)
async def test_frames_keep_their_stream_ids_and_order(scheme: str) -> None:
    async with trio.open_nursery() as nursery:
        info = await start_echo(nursery, scheme)
        assert info.scheme == scheme and info.port > 0
        conn = await transports.connect(info.url, ssl_context=client_context(scheme), max_frame_size=LIMIT)
        sent = [(sid, f"frame {i}".encode()) for i, sid in enumerate([1, 3, 1, 5, 0, 7, 2**31 - 1])]
        for sid, frame in sent:
            await conn.send_frame(sid, frame)
        got = [await conn.receive_frame() for _ in sent]
        assert got == sent
        await conn.end_stream(1)
        await conn.aclose()
        await conn.aclose()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await conn.send_frame(1, b"x")
        with pytest.raises(trio.ClosedResourceError):
            await conn.receive_frame()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(15)
async def test_a_clean_close_by_the_peer_is_end_of_channel_and_sending_to_it_is_broken(scheme: str) -> None:
    async with trio.open_nursery() as nursery:
        info = await start_echo(nursery, scheme)
        conn = await transports.connect(info.url, ssl_context=client_context(scheme), max_frame_size=LIMIT)
        await conn.send_frame(1, b"before")
        await conn.send_frame(1, b"close")
        assert await conn.receive_frame() == (1, b"before")
        with pytest.raises(trio.EndOfChannel):
            await conn.receive_frame()
        with pytest.raises(trio.BrokenResourceError):  # a peer that closed is gone: nobody reads
            await conn.send_frame(1, b"after")
        await conn.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(15)
async def test_a_server_that_goes_away_breaks_the_link(scheme: str) -> None:
    async with trio.open_nursery() as nursery:
        info = await start_echo(nursery, scheme)
        conn = await transports.connect(info.url, ssl_context=client_context(scheme), max_frame_size=LIMIT)
        await conn.send_frame(1, b"ping")
        assert await conn.receive_frame() == (1, b"ping")
        nursery.cancel_scope.cancel()  # the server stops while the client is connected
    with pytest.raises((trio.BrokenResourceError, trio.EndOfChannel)):
        await conn.receive_frame()
    await conn.aclose()


@pytest.mark.parametrize("scheme", SCHEMES)
@trio_test(15)
async def test_an_oversized_frame_is_refused_and_the_connection_stays_usable(scheme: str) -> None:
    async with trio.open_nursery() as nursery:
        info = await start_echo(nursery, scheme)
        conn = await transports.connect(info.url, ssl_context=client_context(scheme), max_frame_size=LIMIT)
        await conn.send_frame(1, b"x" * (LIMIT + 1))
        assert await conn.receive_frame() == (0, b"too large")
        await conn.send_frame(3, b"x" * LIMIT)  # exactly the limit is fine
        assert await conn.receive_frame() == (3, b"x" * LIMIT)
        await conn.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "memory"])
@trio_test(15)
async def test_nothing_listening_is_an_os_error(scheme: str) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago and is closed now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises((OSError, trio.BrokenResourceError)):
        await transports.connect(f"{scheme}://127.0.0.1:{port}", ssl_context=client_context(scheme))


@trio_test(5)
async def test_memory_abort_breaks_both_directions() -> None:
    memory = importlib.import_module(f"{transports.__name__}.memory")
    client, server = memory.connection_pair(max_frame_size=LIMIT)
    await client.send_frame(1, b"lost in flight")
    server.abort()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_frame()
    with pytest.raises(trio.BrokenResourceError):
        await client.send_frame(1, b"x")
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_frame()


def test_an_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(transports.UnknownTransportError) as info:
        transports.get_transport("carrier-pigeon")
    for scheme in ("ws", "wss", "memory"):
        assert scheme in str(info.value)


def test_the_registry_returns_one_object_per_scheme() -> None:
    assert transports.get_transport("ws") is transports.get_transport("wss")
    assert "memory" in transports.available_schemes()
