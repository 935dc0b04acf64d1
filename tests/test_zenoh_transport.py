"""What only the zenoh:// transport has to show (the contract itself is tested over every scheme
in test_server_transports.py): a peer whose Zenoh session dies without a goodbye is seen through
its liveliness token, and a Zenoh node with no pydisco server behind it refuses the connection.
Loopback only, multicast scouting off."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import trio

pytest.importorskip("zenoh")

from cloud_support import trio_test  # noqa: E402
from pydisco import transports  # noqa: E402
from pydisco.transports import zenoh as zenoh_transport  # noqa: E402
from zenoh_support import free_port, loopback_config  # noqa: E402

ECHO_SERVER = textwrap.dedent(
    """
    import sys, trio
    from pydisco import transports

    async def echo(connection):
        while True:
            stream_id, frame = await connection.receive_frame()
            await connection.send_frame(stream_id, frame)

    async def main():
        async with trio.open_nursery() as nursery:
            info = await nursery.start(transports.serve, echo, "zenoh://127.0.0.1:0")
            print(info.url, flush=True)

    trio.run(main)
    """
)


@trio_test(60)
async def test_a_server_process_killed_mid_connection_breaks_the_link() -> None:
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = (await trio.to_thread.run_sync(server.stdout.readline)).strip()
        conn = await transports.connect(url)
        await conn.send_frame(1, b"ping")
        assert await conn.receive_frame() == (1, b"ping")
        server.send_signal(signal.SIGKILL)  # no goodbye: only its session's disappearance tells
        with pytest.raises(trio.BrokenResourceError, match="went away"):
            await conn.receive_frame()
        with pytest.raises(trio.BrokenResourceError):
            await conn.send_frame(1, b"after")
        await conn.aclose()
    finally:
        server.kill()
        server.wait()


@trio_test(30)
async def test_a_client_whose_session_dies_is_a_broken_link_for_the_server() -> None:
    seen: list[BaseException] = []
    handled = trio.Event()

    async def record(connection: transports.FrameConnection) -> None:
        try:
            while True:
                await connection.receive_frame()
        except (trio.BrokenResourceError, trio.EndOfChannel) as e:
            seen.append(e)
            handled.set()

    async with trio.open_nursery() as nursery:
        info: transports.ListenerInfo = await nursery.start(transports.serve, record, "zenoh://127.0.0.1:0")
        conn = await transports.connect(info.url)
        assert isinstance(conn, zenoh_transport.ZenohConnection)
        await conn.send_frame(1, b"hello")
        await trio.to_thread.run_sync(conn._release)  # the session closes as a crash would: no goodbye
        await handled.wait()
        nursery.cancel_scope.cancel()
    (error,) = seen
    assert isinstance(error, trio.BrokenResourceError) and "went away" in str(error)


@trio_test(30)
async def test_a_zenoh_node_without_a_pydisco_server_refuses_the_connection() -> None:
    import zenoh

    port = free_port()
    with zenoh.open(loopback_config(listen=[f"tcp/127.0.0.1:{port}"])):
        with pytest.raises(ConnectionRefusedError, match="no pydisco server answers on pydisco/cloud"):
            await transports.connect(f"zenoh://127.0.0.1:{port}")


@pytest.mark.parametrize("url", ["zenoh://127.0.0.1", "zenoh:///nohost", "zenoh://h:notaport"])
@trio_test(10)
async def test_a_url_without_host_and_port_is_refused(url: str) -> None:
    with pytest.raises((ValueError, transports.UnknownTransportError)):
        await transports.connect(url)


@trio_test(60)
async def test_through_a_zenoh_router_each_connection_reaches_exactly_one_of_two_servers() -> None:
    import zenoh

    served: list[str] = []

    def echo_as(name: str) -> transports.ConnectionHandler:
        async def echo(connection: transports.FrameConnection) -> None:
            served.append(name)
            try:
                while True:
                    stream_id, frame = await connection.receive_frame()
                    await connection.send_frame(stream_id, name.encode() + frame)
            except (trio.EndOfChannel, trio.BrokenResourceError):
                pass

        return echo

    async with trio.open_nursery() as nursery:
        a: transports.ListenerInfo = await nursery.start(transports.serve, echo_as("A"), "zenoh://127.0.0.1:0")
        b: transports.ListenerInfo = await nursery.start(transports.serve, echo_as("B"), "zenoh://127.0.0.1:0")
        router_port = free_port()
        servers = [f"tcp/127.0.0.1:{a.port}", f"tcp/127.0.0.1:{b.port}"]
        with zenoh.open(loopback_config("router", listen=[f"tcp/127.0.0.1:{router_port}"], connect=servers)):
            for i in range(4):  # the client knows only the router, as a robot's device would
                conn = await transports.connect(f"zenoh://127.0.0.1:{router_port}")
                await conn.send_frame(1, b"x%d" % i)
                stream_id, reply = await conn.receive_frame()
                assert stream_id == 1 and reply[1:] == b"x%d" % i and reply[:1].decode() == served[-1]
                await conn.aclose()
        nursery.cancel_scope.cancel()
    assert len(served) == 4  # one handler per connection: no second server took it too


@trio_test(60)
async def test_a_server_gone_mid_answer_is_a_failover_to_the_device() -> None:
    from cloud_support import TOKEN, StubBackend, start_server
    from pydisco import RuntimeConfig, open_runtime
    from pydisco._types import TokenPiece
    from pydisco.cloud import open_cloud_endpoint
    from pydisco.policies._base import Slo
    from pydisco.testing import ScriptedEndpoint

    length = 30
    same_tokens = [TokenPiece(position=i, token_id=i, text=f"t{i} ") for i in range(length)]  # StubBackend's
    config = RuntimeConfig(device_model=None, dispatch="cloud-only", migration="never", slo=Slo(reading_rate=400.0))
    async with trio.open_nursery() as nursery:
        server, life = await start_server(nursery, StubBackend(period=0.02), ["zenoh"])
        async with open_cloud_endpoint(server.urls[0], token=TOKEN) as cloud:
            device = ScriptedEndpoint("device", same_tokens, prefill_s=0.01, gaps_s=[0.002])
            async with open_runtime(config, endpoints={"device": device, "cloud": cloud}) as rt:
                async with rt.stream(prompt="x", max_tokens=length) as answer:
                    async for piece in answer:
                        if piece.position == 4:
                            life.cancel()  # the server goes away mid-answer
                report = answer.report
        nursery.cancel_scope.cancel()
    assert report.text == "".join(p.text for p in same_tokens) and report.finish_reason == "length"
    (failover,) = report.migrations
    assert (failover.kind, failover.source, failover.target) == ("failover", "cloud", "device")
    assert failover.handover_position >= 5
