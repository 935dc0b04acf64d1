"""The link emulator over real loopback sockets.

Timing asserts are one-sided where the machine can only make things slower (a delay is never
shorter than configured) and generous on the other side, so a busy machine does not fail them.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import random
import statistics
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from pydisco._errors import ConfigurationError
from pydisco.linkemu import (
    REALISTIC_LAST_HOP,
    Constant,
    DelayDistribution,
    Empirical,
    LinkControl,
    LinkProfile,
    LogNormal,
    Normal,
    serve_tcp_proxy,
    serve_udp_proxy,
)

LOCAL = "127.0.0.1"
SLACK = 0.010  # scheduling overhead a loaded machine may add to a delay (median), seconds
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SERVER_TTFT = SHARED_DATA / "server_ttft"
STAMP = struct.Struct(">Id")  # sequence number, send time


def run(test: Callable[[], Awaitable[None]], limit: float = 10.0) -> None:
    async def main() -> None:
        with trio.fail_after(limit):
            await test()

    trio.run(main)


class UdpSink:
    """A UDP socket that records every datagram's arrival time, and can answer."""

    def __init__(self) -> None:
        self.sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        self.arrivals: list[tuple[float, bytes]] = []
        self.echo = False

    async def bind(self) -> int:
        await self.sock.bind((LOCAL, 0))
        port: int = self.sock.getsockname()[1]
        return port

    async def serve(self) -> None:
        while True:
            data, addr = await self.sock.recvfrom(65535)
            self.arrivals.append((trio.current_time(), data))
            if self.echo:
                await self.sock.sendto(data, addr)


async def start_udp(
    nursery: trio.Nursery, up: LinkProfile, down: LinkProfile, *, seed: int = 0,
    control: LinkControl | None = None,
) -> tuple[UdpSink, trio.socket.SocketType]:
    """A sink behind a UDP proxy, and a client socket connected to the proxy."""
    sink = UdpSink()
    port = await sink.bind()
    nursery.start_soon(sink.serve)
    proxy_port = await nursery.start(functools.partial(
        serve_udp_proxy, LOCAL, 0, LOCAL, port, up, down, seed=seed, control=control))
    client = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await client.connect((LOCAL, proxy_port))
    nursery.start_soon(close_at_exit, sink.sock, client)
    return sink, client


async def close_at_exit(*socks: trio.socket.SocketType) -> None:
    """Close the sockets when the test's nursery is cancelled."""
    try:
        await trio.sleep_forever()
    finally:
        for sock in socks:
            sock.close()


def one_way_delays(sink: UdpSink) -> dict[int, float]:
    delays = {}
    for arrived, data in sink.arrivals:
        seq, sent = STAMP.unpack(data[: STAMP.size])
        delays[seq] = arrived - sent
    return delays


async def send_stamped(client: trio.socket.SocketType, count: int, gap: float) -> None:
    for seq in range(count):
        await client.send(STAMP.pack(seq, trio.current_time()))
        await trio.sleep(gap)


# ----- distributions and profiles ------------------------------------------------------------


@pytest.mark.parametrize(
    "dist",
    [Constant(0.01), Normal(0.01, 0.02), LogNormal(0.005, 0.8), Empirical((0.1, 0.2, 0.4))],
    ids=repr,
)
def test_distribution_sample_mean_matches_its_mean_and_is_reproducible(
    dist: DelayDistribution,
) -> None:
    rng = random.Random(7)
    draws = [dist.sample(rng) for _ in range(20_000)]
    assert min(draws) >= 0
    spread = statistics.pstdev(draws)
    assert abs(statistics.fmean(draws) - dist.mean) <= 5 * spread / math.sqrt(len(draws)) + 1e-12
    again = random.Random(7)
    assert [dist.sample(again) for _ in range(20_000)] == draws


def test_profile_validation() -> None:
    with pytest.raises(ConfigurationError):
        LinkProfile(loss=1.0)
    with pytest.raises(ConfigurationError):
        LinkProfile(latency=-0.001)
    with pytest.raises(ConfigurationError):
        Normal(-0.01, 0.01)
    with pytest.raises(ConfigurationError):
        Empirical(())
    with pytest.raises(ConfigurationError):
        LinkProfile(bandwidth=0)


def test_realistic_last_hop_round_trip_is_wifi_lte_like() -> None:
    rng = random.Random(1)
    rtts = sorted(
        REALISTIC_LAST_HOP.sample_delay(rng) + REALISTIC_LAST_HOP.sample_delay(rng)
        for _ in range(10_000)
    )
    assert 0.030 <= rtts[len(rtts) // 2] <= 0.045  # the docstring's "about 38 ms median"
    assert rtts[int(0.99 * len(rtts))] >= 0.045  # and a tail


# ----- UDP -------------------------------------------------------------------------------------


def test_udp_added_latency_follows_the_profile() -> None:
    up = LinkProfile(latency=0.020, jitter=Normal(0.010, 0.004))
    count = 200

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sink, client = await start_udp(nursery, up, LinkProfile())
            await send_stamped(client, count, 0.001)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        delays = list(one_way_delays(sink).values())
        assert len(delays) == count
        assert min(delays) >= up.latency  # the truncated jitter never subtracts
        sampling_error = 5 * 0.004 / math.sqrt(count)
        assert up.mean_delay - sampling_error <= statistics.fmean(delays)
        assert statistics.median(delays) <= up.mean_delay + sampling_error + SLACK

    run(main)


def test_udp_loss_rate_is_close_to_configured_and_seeded() -> None:
    loss, count = 0.2, 1500

    async def lost_sequence_numbers(seed: int) -> set[int]:
        async with trio.open_nursery() as nursery:
            sink, client = await start_udp(nursery, LinkProfile(loss=loss), LinkProfile(), seed=seed)
            for seq in range(count):
                await client.send(STAMP.pack(seq, 0.0))
                if seq % 50 == 49:
                    await trio.sleep(0.002)  # keep the kernel's socket buffers from overflowing
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        return set(range(count)) - set(one_way_delays(sink))

    async def main() -> None:
        first = await lost_sequence_numbers(seed=3)
        sd = math.sqrt(count * loss * (1 - loss))
        assert abs(len(first) - count * loss) <= 5 * sd
        assert await lost_sequence_numbers(seed=3) == first
        assert await lost_sequence_numbers(seed=4) != first

    run(main)


def test_udp_cut_drops_traffic_and_restore_resumes_it() -> None:
    async def main() -> None:
        control = LinkControl()
        async with trio.open_nursery() as nursery:
            sink, client = await start_udp(nursery, LinkProfile(), LinkProfile(), control=control)
            sink.echo = True
            await client.send(b"before")
            assert await client.recv(100) == b"before"
            control.cut()
            for _ in range(5):
                await client.send(b"during")
            await trio.sleep(0.1)
            assert [data for _, data in sink.arrivals] == [b"before"]
            assert control.statistics("up").dropped_while_cut == 5
            control.restore()
            await client.send(b"after")
            assert await client.recv(100) == b"after"
            nursery.cancel_scope.cancel()

    run(main)


def test_set_profile_changes_latency_at_runtime() -> None:
    async def main() -> None:
        control = LinkControl()
        async with trio.open_nursery() as nursery:
            sink, client = await start_udp(nursery, LinkProfile(), LinkProfile(), control=control)
            control.set_profile(up=LinkProfile(latency=0.050))
            await client.send(STAMP.pack(0, trio.current_time()))
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        (delay,) = one_way_delays(sink).values()
        assert 0.050 <= delay <= 0.050 + 4 * SLACK

    run(main)


# ----- TCP -------------------------------------------------------------------------------------


async def start_tcp(
    nursery: trio.Nursery,
    up: LinkProfile,
    down: LinkProfile,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    control: LinkControl | None = None,
) -> int:
    listeners = await trio.open_tcp_listeners(0, host=LOCAL)
    await nursery.start(trio.serve_listeners, handler, listeners)
    target_port = listeners[0].socket.getsockname()[1]
    port: int = await nursery.start(functools.partial(
        serve_tcp_proxy, LOCAL, 0, LOCAL, target_port, up, down, seed=1, control=control))
    return port


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # the proxy reset us (cut with reset=True)


def test_tcp_round_trip_adds_both_directions_latency() -> None:
    up, down = LinkProfile(latency=0.015), LinkProfile(latency=0.025)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await start_tcp(nursery, up, down, echo)
            stream = await trio.open_tcp_stream(LOCAL, port)
            rtts = []
            for _ in range(10):
                start = trio.current_time()
                await stream.send_all(b"ping")
                assert await stream.receive_some(100) == b"ping"
                rtts.append(trio.current_time() - start)
            await stream.aclose()
            nursery.cancel_scope.cancel()
        expected = up.latency + down.latency
        assert min(rtts) >= expected
        assert statistics.median(rtts) <= expected + SLACK

    run(main)


def test_tcp_keeps_byte_order_under_heavy_jitter() -> None:
    # Jitter (sd 20 ms) far above the 1 ms gap between writes would reorder datagrams; a TCP
    # stream must come out intact, each chunk no earlier than its own delay allows.
    up = LinkProfile(latency=0.005, jitter=Normal(0.010, 0.020))
    messages = [b"%05d;" % i for i in range(300)]
    received = bytearray()

    async def main() -> None:
        done = trio.Event()

        async def collect(stream: trio.SocketStream) -> None:
            async with stream:
                async for data in stream:
                    received.extend(data)
            done.set()

        async with trio.open_nursery() as nursery:
            port = await start_tcp(nursery, up, LinkProfile(), collect)
            stream = await trio.open_tcp_stream(LOCAL, port)
            start = trio.current_time()
            for message in messages:
                await stream.send_all(message)
                await trio.sleep(0.001)
            await stream.send_eof()
            await done.wait()
            assert trio.current_time() - start >= up.latency + 0.3  # nothing arrived early
            await stream.aclose()
            nursery.cancel_scope.cancel()
        assert bytes(received) == b"".join(messages)

    run(main)


def test_tcp_loss_becomes_a_retransmission_delay_not_lost_bytes() -> None:
    rto, count = 0.040, 30
    up = LinkProfile(loss=0.3, rto=rto)
    arrivals: list[float] = []

    async def main() -> None:
        async def stamp(stream: trio.SocketStream) -> None:
            async with stream:
                async for _ in stream:
                    arrivals.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            port = await start_tcp(nursery, up, LinkProfile(), stamp)
            stream = await trio.open_tcp_stream(LOCAL, port)
            sent = []
            for _ in range(count):  # spaced by more than the RTO, so each chunk stands alone
                sent.append(trio.current_time())
                await stream.send_all(b"x")
                await trio.sleep(rto + 0.010)
            await trio.sleep(rto + 0.02)  # the last chunk may still be held for an RTO
            await stream.aclose()
            nursery.cancel_scope.cancel()
        assert len(arrivals) == count  # TCP delivers everything
        delays = [a - s for a, s in zip(arrivals, sent)]
        late = sum(d >= rto for d in delays)
        sd = math.sqrt(count * 0.3 * 0.7)
        assert abs(late - count * 0.3) <= 4 * sd
        assert late > 0

    run(main)


def test_tcp_cut_holds_bytes_and_restore_delivers_them() -> None:
    async def main() -> None:
        control = LinkControl()
        async with trio.open_nursery() as nursery:
            port = await start_tcp(nursery, LinkProfile(), LinkProfile(), echo, control=control)
            stream = await trio.open_tcp_stream(LOCAL, port)
            await stream.send_all(b"a")
            assert await stream.receive_some(10) == b"a"
            control.cut()
            await stream.send_all(b"b")
            with trio.move_on_after(0.2) as waited:
                await stream.receive_some(10)
            assert waited.cancelled_caught  # nothing crosses a cut link
            control.restore()
            assert await stream.receive_some(10) == b"b"
            await stream.aclose()
            nursery.cancel_scope.cancel()

    run(main)


def test_tcp_cut_with_reset_breaks_connections_until_restored() -> None:
    async def main() -> None:
        control = LinkControl()
        async with trio.open_nursery() as nursery:
            port = await start_tcp(nursery, LinkProfile(), LinkProfile(), echo, control=control)
            stream = await trio.open_tcp_stream(LOCAL, port)
            await stream.send_all(b"a")
            assert await stream.receive_some(10) == b"a"
            control.cut(reset=True)
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(10)
            fresh = await trio.open_tcp_stream(LOCAL, port)  # the kernel accepts, the proxy resets
            with pytest.raises(trio.BrokenResourceError):
                await fresh.receive_some(10)
            control.restore()
            again = await trio.open_tcp_stream(LOCAL, port)
            await again.send_all(b"c")
            assert await again.receive_some(10) == b"c"
            for s in (stream, fresh, again):
                await s.aclose()
            nursery.cancel_scope.cancel()

    run(main)


# ----- measured server records -------------------------------------------------------------------


needs_shared_data = pytest.mark.skipif(
    not SERVER_TTFT.is_dir(),
    reason=f"the measured server records are not here ({SERVER_TTFT}); they live outside the repo",
)


@pytest.mark.shared_data
@needs_shared_data
def test_server_ttft_profile_samples_within_the_measured_range() -> None:
    path = SERVER_TTFT / "groq_70b.json"
    records = json.loads(path.read_text())
    measured = [r["ttft_s"] for r in records if r["error_code"] is None]
    profile = LinkProfile.from_server_ttft(path)
    rng = random.Random(5)
    draws = [profile.sample_delay(rng) for _ in range(5000)]
    assert min(measured) <= min(draws) and max(draws) <= max(measured)
    assert abs(statistics.median(draws) - statistics.median(measured)) <= 0.05 * statistics.median(measured)
    assert profile.mean_delay == pytest.approx(statistics.fmean(measured))


@pytest.mark.shared_data
@needs_shared_data
def test_server_ttft_by_name_skips_failed_requests() -> None:
    by_name = LinkProfile.from_server_ttft("lepton_70b", data_dir=SERVER_TTFT)
    records = json.loads((SERVER_TTFT / "lepton_70b.json").read_text())
    ok = [r["ttft_s"] for r in records if r["error_code"] is None]
    assert isinstance(by_name.jitter, Empirical)
    assert sorted(by_name.jitter.samples) == sorted(ok)
    assert len(ok) < len(records)  # this file has failures, and they are left out
    itl = LinkProfile.from_server_ttft("groq_70b", data_dir=SERVER_TTFT, field="inter_token_latency_s")
    assert itl.mean_delay < 0.05


def test_server_ttft_without_data_says_what_to_do(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYDISCO_SERVER_TTFT_DIR", raising=False)
    with pytest.raises(ConfigurationError, match="PYDISCO_SERVER_TTFT_DIR"):
        LinkProfile.from_server_ttft("groq_70b")
    with pytest.raises(ConfigurationError, match="cannot read"):
        LinkProfile.from_server_ttft(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"ttft_s": 0.1, "error_code": 500}]))
    with pytest.raises(ConfigurationError, match="no successful record"):
        LinkProfile.from_server_ttft(tmp_path / "bad.json")
