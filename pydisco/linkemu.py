"""A user-space link emulator: loopback proxies for TCP and UDP that add one-way latency,
jitter, loss and an optional bandwidth limit, each direction on its own, for benchmarks and
failover tests on machines without kernel netem. See docs/linkemu.md.

::

    control = LinkControl()
    port = await nursery.start(functools.partial(
        serve_udp_proxy, "127.0.0.1", 0, "127.0.0.1", server_port,
        REALISTIC_LAST_HOP, REALISTIC_LAST_HOP, seed=1, control=control))
    ...                      # clients talk to 127.0.0.1:port instead of the server
    control.cut()            # the link goes dark; control.restore() brings it back

A direction's delay for each UDP datagram, or each chunk of a TCP stream (what one read from
the sender returned), is ``latency + jitter.sample()``, drawn from a seeded ``random.Random``,
so a run that sends the same traffic in the same order sees the same delays and losses.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import json
import math
import os
import pathlib
import random
import socket
import statistics
import struct
from collections.abc import Awaitable, Callable
from typing import Literal

import trio

from ._errors import ConfigurationError

Direction = Literal["up", "down"]
"""``up``: from the proxy's clients to the target; ``down``: back."""

TCP_CHUNK = 65536
TCP_CHUNKS_IN_FLIGHT = 64  # per direction per connection, before the proxy stops reading
UDP_QUEUE = 10_000  # datagrams waiting for delivery per proxy before more are dropped
UDP_MAX = 65535
TCP_SEGMENT = 1460  # bytes per segment, for TCP's loss model
SERVER_TTFT_ENV = "PYDISCO_SERVER_TTFT_DIR"


# ----- delay distributions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Constant:
    """Always ``value`` seconds."""

    value: float = 0.0

    def __post_init__(self) -> None:
        _check_delay("value", self.value)

    @property
    def mean(self) -> float:
        return self.value

    def sample(self, rng: random.Random) -> float:
        return self.value


@dataclasses.dataclass(frozen=True)
class Normal:
    """A normal distribution truncated at 0 (negative draws are redrawn, not clamped, so there
    is no spike at 0). ``mean`` must be >= 0, which keeps at least half the draws."""

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        _check_delay("mu", self.mu)
        _check_delay("sigma", self.sigma)

    @property
    def mean(self) -> float:
        """The truncated distribution's mean: mu + sigma * phi(a) / (1 - Phi(a)), a = -mu/sigma."""
        if self.sigma == 0:
            return self.mu
        a = -self.mu / self.sigma
        pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        tail = 0.5 * math.erfc(a / math.sqrt(2))
        return self.mu + self.sigma * pdf / tail

    def sample(self, rng: random.Random) -> float:
        while True:
            value = rng.gauss(self.mu, self.sigma)
            if value >= 0:
                return value


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """A log-normal distribution: ``median * exp(sigma * N(0, 1))``; always > 0, long tail."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        _check_delay("median", self.median)
        _check_delay("sigma", self.sigma)

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)

    def sample(self, rng: random.Random) -> float:
        return self.median * math.exp(rng.gauss(0.0, self.sigma))


@dataclasses.dataclass(frozen=True)
class Empirical:
    """Measured delays, drawn uniformly with replacement (a bootstrap of the measurements)."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ConfigurationError("an empirical distribution needs at least one sample")
        for value in self.samples:
            _check_delay("sample", value)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def sample(self, rng: random.Random) -> float:
        return self.samples[rng.randrange(len(self.samples))]


DelayDistribution = Constant | Normal | LogNormal | Empirical


def _check_delay(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"{name} must be a finite number >= 0 seconds, got {value!r}")


# ----- profiles --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """One direction of an emulated link.

    Delay of each datagram or TCP chunk = ``latency + jitter.sample()``, plus its serialisation
    time when ``bandwidth`` is set. ``loss`` is a probability: a UDP datagram is dropped; TCP
    cannot lose bytes (the kernel retransmits), so a chunk that would lose one of its segments
    (probability ``1 - (1 - loss) ** segments``, 1460-byte segments) is delayed by ``rto``
    instead, which is what a retransmission after a timeout costs. TCP never reorders: a chunk
    is delivered at max(the previous chunk's delivery, now + its delay).
    """

    latency: float = 0.0
    """Base one-way delay, seconds."""
    jitter: DelayDistribution = Constant(0.0)
    """Extra delay drawn for each datagram or chunk, seconds (>= 0)."""
    loss: float = 0.0
    bandwidth: float | None = None
    """Bytes per second, or None for no limit."""
    rto: float = 0.2
    """TCP: the delay a lost segment adds (Linux's minimum retransmission timeout is 200 ms)."""

    def __post_init__(self) -> None:
        _check_delay("latency", self.latency)
        _check_delay("rto", self.rto)
        if not 0.0 <= self.loss < 1.0:
            raise ConfigurationError(f"loss must be in [0, 1), got {self.loss!r}")
        if self.bandwidth is not None and not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ConfigurationError(f"bandwidth must be > 0 bytes/s, got {self.bandwidth!r}")

    @property
    def mean_delay(self) -> float:
        """Mean one-way delay before serialisation and loss, seconds."""
        return self.latency + self.jitter.mean

    def sample_delay(self, rng: random.Random) -> float:
        return self.latency + self.jitter.sample(rng)

    @classmethod
    def from_server_ttft(
        cls,
        path_or_name: str | os.PathLike[str],
        *,
        field: str = "ttft_s",
        scale: float = 1.0,
        data_dir: str | os.PathLike[str] | None = None,
        loss: float = 0.0,
        bandwidth: float | None = None,
    ) -> LinkProfile:
        """A profile whose delay is drawn from measured per-request records (the llmperf
        ``server_ttft`` JSON format: a list of records with ``ttft_s``,
        ``inter_token_latency_s``, ..., ``error_code``).

        ``path_or_name`` is a JSON file, or a name such as ``"groq_70b"`` looked up as
        ``<data_dir>/<name>.json``, ``data_dir`` defaulting to ``$PYDISCO_SERVER_TTFT_DIR``.
        pydisco ships no such data: you supply the file. Records with an ``error_code`` are
        skipped. Each delay is one measured ``field`` value times ``scale``.
        """
        path = _resolve_ttft(path_or_name, data_dir)
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read server records from {path}: {exc}") from exc
        if not isinstance(records, list):
            raise ConfigurationError(f"{path}: expected a JSON list of records")
        samples = tuple(
            float(r[field]) * scale
            for r in records
            if isinstance(r, dict) and r.get("error_code") is None and r.get(field) is not None
        )
        if not samples:
            raise ConfigurationError(f"{path}: no successful record has a {field!r} value")
        return cls(jitter=Empirical(samples), loss=loss, bandwidth=bandwidth)


def _resolve_ttft(
    path_or_name: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None
) -> pathlib.Path:
    path = pathlib.Path(path_or_name)
    if path.suffix == ".json" or path.exists():
        return path
    folder = data_dir if data_dir is not None else os.environ.get(SERVER_TTFT_ENV)
    if folder is None:
        raise ConfigurationError(
            f"{str(path_or_name)!r} is not a file; to use a name, pass data_dir= or set "
            f"${SERVER_TTFT_ENV} to the folder holding <name>.json"
        )
    return pathlib.Path(folder) / f"{path}.json"


REALISTIC_LAST_HOP = LinkProfile(
    latency=0.015,
    jitter=LogNormal(median=0.003, sigma=0.8),
    loss=0.005,
    bandwidth=2.5e6,
)
"""A device on Wi-Fi or LTE talking to a nearby cloud region, one direction.

15 ms base + log-normal jitter (median 3 ms, sigma 0.8: mean 4.1 ms, p99 about 19 ms) gives a
round trip of about 38 ms median with a tail past 60 ms: in the range public measurements
report for Wi-Fi broadband (20-40 ms) and LTE (30-60 ms) to a nearby region. 0.5 % loss is the
residual loss Wi-Fi and LTE show after their own link-layer retransmissions (typically well
under 1 %). 2.5 MB/s (20 Mbit/s) is a modest LTE/Wi-Fi uplink; an answer's tokens are far
below it, so it matters only for large prompts. These are typical figures chosen for tests and
benchmarks, not measurements of this machine's network.
"""


# ----- control -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkStatistics:
    """Counters of one proxy direction."""

    forwarded: int
    """Datagrams or TCP chunks delivered."""
    lost: int
    """UDP datagrams dropped by the loss model, or TCP chunks delayed by ``rto`` instead."""
    dropped_while_cut: int
    """UDP datagrams dropped because the link was cut (TCP holds its bytes instead)."""


class _Counters:
    def __init__(self) -> None:
        self.forwarded = self.lost = self.dropped_while_cut = 0

    def snapshot(self) -> LinkStatistics:
        return LinkStatistics(self.forwarded, self.lost, self.dropped_while_cut)


class _Link:
    """The live state of one proxy: its current profiles and cut flag."""

    def __init__(self, up: LinkProfile, down: LinkProfile, seed: int) -> None:
        self.profiles: dict[Direction, LinkProfile] = {"up": up, "down": down}
        self.seed = seed
        self.cut = False
        self.reset_mode = False  # cut(reset=True): new TCP connections are reset too
        self.restored = trio.Event()
        self.restored.set()
        self.resets: set[trio.CancelScope] = set()  # live TCP connections and UDP mappings
        self.counters: dict[Direction, _Counters] = {"up": _Counters(), "down": _Counters()}

    def rng(self, *key: object) -> random.Random:
        # A string seed is hashed (SHA-512) by random.Random: stable across runs and platforms.
        return random.Random(":".join(str(part) for part in (self.seed, *key)))

    async def wait_restored(self) -> None:
        while self.cut:
            await self.restored.wait()


class LinkControl:
    """Cuts and restores the links of the proxies it was given to, and changes their profiles,
    while they run. One control may drive several proxies (say a TCP and a UDP one)."""

    def __init__(self) -> None:
        self._links: list[_Link] = []

    def cut(self, *, reset: bool = False) -> None:
        """Stop all traffic: UDP datagrams are dropped; TCP bytes are held (as the peers'
        retransmissions would deliver them once the link is back) and new TCP connections
        wait. With ``reset=True``, TCP connections are also reset (both ends see
        ``ECONNRESET``) and UDP mappings forgotten, as by a NAT or middlebox restart; new TCP
        connections are reset until ``restore()``."""
        for link in self._links:
            if not link.cut:
                link.cut = True
                link.restored = trio.Event()
            link.reset_mode = link.reset_mode or reset
            if reset:
                for scope in list(link.resets):
                    scope.cancel()

    def restore(self) -> None:
        """Let traffic flow again; held TCP bytes are delivered in order."""
        for link in self._links:
            link.cut = False
            link.reset_mode = False
            link.restored.set()

    def set_profile(self, *, up: LinkProfile | None = None, down: LinkProfile | None = None) -> None:
        """Use these profiles for traffic from now on (what is already in flight keeps its
        delivery time)."""
        for link in self._links:
            if up is not None:
                link.profiles["up"] = up
            if down is not None:
                link.profiles["down"] = down

    def statistics(self, direction: Direction) -> LinkStatistics:
        """Counters for ``direction``, summed over the controlled proxies."""
        snaps = [link.counters[direction].snapshot() for link in self._links]
        return LinkStatistics(
            forwarded=sum(s.forwarded for s in snaps),
            lost=sum(s.lost for s in snaps),
            dropped_while_cut=sum(s.dropped_while_cut for s in snaps),
        )

    def _attach(self, link: _Link) -> None:
        self._links.append(link)

    def _detach(self, link: _Link) -> None:
        self._links.remove(link)


def _make_link(
    up: LinkProfile, down: LinkProfile, seed: int, control: LinkControl | None
) -> tuple[_Link, LinkControl]:
    link = _Link(up, down, seed)
    control = control if control is not None else LinkControl()
    control._attach(link)
    return link, control


# ----- TCP -----------------------------------------------------------------------------------------


async def serve_tcp_proxy(
    listen_host: str,
    listen_port: int,
    target_host: str,
    target_port: int,
    profile_up: LinkProfile,
    profile_down: LinkProfile,
    *,
    seed: int = 0,
    control: LinkControl | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TCP connections on ``listen_host:listen_port`` and relay each to the target
    through the emulated link until cancelled; reports the bound port through ``task_status``.

    Each connection opens its own upstream connection (refused: the client is reset). Byte
    order is preserved in each direction, half-closes are relayed, and a reset on either side
    resets the other. On cancellation every relayed connection is closed.
    """
    link, control = _make_link(profile_up, profile_down, seed, control)
    try:
        listeners = await trio.open_tcp_listeners(listen_port, host=listen_host)
        counter = itertools.count()
        handler = functools.partial(_relay_tcp, link, target_host, target_port, counter)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(listeners[0].socket.getsockname()[1])
    finally:
        control._detach(link)


class _TcpRelay:
    """One relayed TCP connection; either side's reset resets the whole relay."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.reset_requested = False

    def reset(self) -> None:
        self.reset_requested = True
        self.scope.cancel()


async def _relay_tcp(
    link: _Link, host: str, port: int, counter: itertools.count[int], client: trio.SocketStream
) -> None:
    index = next(counter)
    relay = _TcpRelay()
    link.resets.add(relay.scope)
    upstream: trio.SocketStream | None = None
    finished = False
    try:
        with relay.scope:
            if link.cut and link.reset_mode:
                return  # reset new connections while cut with reset=True
            await link.wait_restored()
            try:
                upstream = await trio.open_tcp_stream(host, port)
            except OSError:
                return  # the target refused: reset the client, as a closed port would
            legs: list[tuple[Direction, trio.SocketStream, trio.SocketStream]] = [
                ("up", client, upstream),
                ("down", upstream, client),
            ]
            async with trio.open_nursery() as nursery:
                for direction, src, dst in legs:
                    rng = link.rng("tcp", index, direction)
                    nursery.start_soon(_relay_direction, link, relay, direction, src, dst, rng)
            finished = not relay.reset_requested
    finally:
        link.resets.discard(relay.scope)
        with trio.CancelScope(shield=True):  # close both even when the proxy is being cancelled
            for stream in (client, upstream):
                if stream is not None:
                    if not finished:
                        _set_abortive(stream)
                    await stream.aclose()


def _set_abortive(stream: trio.SocketStream) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


async def _relay_direction(
    link: _Link,
    relay: _TcpRelay,
    direction: Direction,
    src: trio.SocketStream,
    dst: trio.SocketStream,
    rng: random.Random,
) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](TCP_CHUNKS_IN_FLIGHT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_deliver_tcp, link, relay, direction, receive, dst)
        async with send:
            last_at = -math.inf
            wire_free_at = -math.inf
            while True:
                try:
                    data = await src.receive_some(TCP_CHUNK)
                except trio.BrokenResourceError:
                    relay.reset()
                    return
                profile = link.profiles[direction]
                now = trio.current_time()
                at = now
                if profile.bandwidth is not None:
                    wire_free_at = max(wire_free_at, now) + len(data) / profile.bandwidth
                    at = wire_free_at
                at += profile.sample_delay(rng)
                segments = max(1, -(-len(data) // TCP_SEGMENT))
                if profile.loss and rng.random() < 1 - (1 - profile.loss) ** segments:
                    at += profile.rto
                    link.counters[direction].lost += 1
                last_at = max(last_at, at)  # a TCP stream never overtakes itself
                await send.send((last_at, data))
                if not data:
                    return


async def _deliver_tcp(
    link: _Link,
    relay: _TcpRelay,
    direction: Direction,
    chunks: trio.MemoryReceiveChannel[tuple[float, bytes]],
    dst: trio.SocketStream,
) -> None:
    async with chunks:
        async for at, data in chunks:
            await trio.sleep_until(at)
            await link.wait_restored()
            try:
                if data:
                    await dst.send_all(data)
                else:
                    await dst.send_eof()
            except trio.BrokenResourceError:
                relay.reset()
                return
            link.counters[direction].forwarded += 1


# ----- UDP -----------------------------------------------------------------------------------------


SendFn = Callable[[], Awaitable[object]]
Address = tuple[object, ...]


class _Scheduler:
    """Sends datagrams at their delivery times, earliest first (so jitter can reorder them)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, SendFn]] = []
        self._seq = itertools.count()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, at: float, send: SendFn) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), send))
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed = trio.Event()
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, send = heapq.heappop(self._heap)
                await send()
            deadline = self._heap[0][0] if self._heap else math.inf
            with trio.move_on_at(deadline):
                await self._changed.wait()


class _UdpDirection:
    """Applies one direction's profile to datagrams and schedules their delivery."""

    def __init__(self, link: _Link, direction: Direction, scheduler: _Scheduler) -> None:
        self._link = link
        self._direction = direction
        self._scheduler = scheduler
        self._rng = link.rng("udp", direction)
        self._wire_free_at = -math.inf
        self._counters = link.counters[direction]

    def submit(self, data: bytes, send: Callable[[bytes], Awaitable[object]]) -> None:
        profile = self._link.profiles[self._direction]
        if self._link.cut:
            self.drop_while_cut()
            return
        if profile.loss and self._rng.random() < profile.loss:
            self._counters.lost += 1
            return
        if len(self._scheduler) >= UDP_QUEUE:
            return  # a full queue drops, like a router's
        now = trio.current_time()
        at = now
        if profile.bandwidth is not None:
            self._wire_free_at = max(self._wire_free_at, now) + len(data) / profile.bandwidth
            at = self._wire_free_at
        at += profile.sample_delay(self._rng)
        self._scheduler.push(at, functools.partial(self._deliver, data, send))

    def drop_while_cut(self) -> None:
        self._counters.dropped_while_cut += 1

    async def _deliver(self, data: bytes, send: Callable[[bytes], Awaitable[object]]) -> None:
        if self._link.cut:
            self.drop_while_cut()
            return
        try:
            await send(data)
        except OSError:
            return  # UDP: the datagram is simply lost
        self._counters.forwarded += 1


async def serve_udp_proxy(
    listen_host: str,
    listen_port: int,
    target_host: str,
    target_port: int,
    profile_up: LinkProfile,
    profile_down: LinkProfile,
    *,
    seed: int = 0,
    control: LinkControl | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay UDP datagrams between clients of ``listen_host:listen_port`` and the target through
    the emulated link until cancelled; reports the bound port through ``task_status``.

    Like a NAT, each client address gets its own upstream socket (so the target sees one
    source port per client); the mapping lasts until the proxy stops or a
    ``LinkControl.cut(reset=True)``. Datagrams are delivered at their own delivery times, so
    jitter may reorder them.
    """
    link, control = _make_link(profile_up, profile_down, seed, control)
    try:
        infos = await trio.socket.getaddrinfo(
            listen_host, listen_port, type=trio.socket.SOCK_DGRAM, flags=trio.socket.AI_PASSIVE
        )
        family, _, _, _, listen_addr = infos[0]
        target_info = await trio.socket.getaddrinfo(
            target_host, target_port, type=trio.socket.SOCK_DGRAM
        )
        target = (target_info[0][0], target_info[0][4])
        with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind(listen_addr)
            scheduler = _Scheduler()
            up = _UdpDirection(link, "up", scheduler)
            down = _UdpDirection(link, "down", scheduler)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(scheduler.run)
                relay = _UdpRelay(sock, target, up, down, link, nursery)
                task_status.started(sock.getsockname()[1])
                await relay.read_clients()
    finally:
        control._detach(link)


class _UdpRelay:
    def __init__(
        self,
        sock: trio.socket.SocketType,
        target: tuple[socket.AddressFamily, Address],
        up: _UdpDirection,
        down: _UdpDirection,
        link: _Link,
        nursery: trio.Nursery,
    ) -> None:
        self._sock = sock
        self._target = target
        self._up = up
        self._down = down
        self._link = link
        self._nursery = nursery
        self._mappings: dict[Address, trio.socket.SocketType] = {}

    async def read_clients(self) -> None:
        while True:
            try:
                data, client = await self._sock.recvfrom(UDP_MAX)
            except (ConnectionResetError, ConnectionRefusedError):
                continue  # an ICMP error about an earlier send: UDP ignores it
            if self._link.cut:
                self._up.drop_while_cut()
                continue
            upstream = self._mappings.get(client)
            if upstream is None:
                upstream = await self._open_mapping(client)
            self._up.submit(data, upstream.send)

    async def _open_mapping(self, client: Address) -> trio.socket.SocketType:
        family, addr = self._target
        upstream = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        await upstream.connect(addr)
        self._mappings[client] = upstream
        self._nursery.start_soon(self._read_target, client, upstream)
        return upstream

    async def _read_target(self, client: Address, upstream: trio.socket.SocketType) -> None:
        scope = trio.CancelScope()
        self._link.resets.add(scope)
        try:
            with upstream, scope:
                while True:
                    try:
                        data = await upstream.recv(UDP_MAX)
                    except OSError:
                        continue  # ICMP unreachable from the target: nothing to relay
                    self._down.submit(data, functools.partial(_sendto, self._sock, client))
        finally:
            self._link.resets.discard(scope)
            if self._mappings.get(client) is upstream:
                del self._mappings[client]


async def _sendto(sock: trio.socket.SocketType, addr: Address, data: bytes) -> None:
    await sock.sendto(data, addr)
