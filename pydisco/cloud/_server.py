"""The cloud server: many clients, any registered transports, one backend behind a FCFS queue.

``serve(config)`` listens on every URL of the config; each connection runs one session (a
reader, a writer and one task per answer) around the sans-IO :class:`ServerProtocol`. A session
that fails (bad frames, wrong token, a vanished client) ends alone; the server keeps serving
everyone else. ``RunningServer.drain()`` stops it gracefully (docs/deployment.md); the limits
of a connection (per address, frames per second, handshake deadline) are checked here too.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import hmac
import json
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, Union

import trio

from ._backends import Backend
from .._errors import ConfigurationError, EndpointError, PromptTooLongError
from .protocol import (
    CONNECTION_STREAM,
    ERROR_CODES,
    Authenticated,
    CancelStream,
    CloseConnection,
    Code,
    Error,
    ReaderReported,
    Send,
    ServerOutput,
    ServerProtocol,
    ServerState,
    StartStream,
    encode,
)
from ._tls import Credentials, server_ssl_context
from .._types import GenerationRequest, GenerationResult, TokenPiece
from ..batching._reader import BufferReport, ReportBox
from .._groups import single_exception
from .. import transports as _transports
from ..observability._logging import ANSWER_ID, get_logger
from ..observability._http import HttpListener, parse_host_port, serve_http
from ..observability._prometheus import ServerMetrics


log = get_logger("pydisco.server")

PLAIN_SCHEMES = frozenset({"ws", "memory", "zenoh"})  # every other scheme gets the TLS context
_FLUSH_TIMEOUT = 2.0  # how long a closing session tries to deliver its last frames
_SHUTDOWN_NOTICE = 0.2  # how long a stopping server spends telling a client why
_WRITE_BATCH = 1024  # most queued items the writer takes into one write


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How to run a server.

    ``tokens`` are the accepted bearer tokens (at least one). TLS, needed by ``wss`` and
    ``quic`` listeners, comes from ``ssl_context`` or from ``cert_file`` + ``key_file``.
    ``parallel`` answers run at once (the backend should have as many engines; a
    ``BatchedBackend`` says how many it takes in, ``parallel``); up to ``max_queue`` more wait in
    FCFS order, beyond that requests get ``overloaded``. ``scheduler`` names that gate in front
    of the backend (``SCHEDULERS``); a batched backend's step scheduler is its own.
    ``metrics_listen`` (``HOST:PORT``): serve ``/metrics`` (Prometheus) and ``/healthz`` over
    plain HTTP there (docs/observability.md). ``freeze_gc``: once every listener is up, collect
    garbage and move every object left (modules, the model's, the backend's) to Python's
    permanent generation (``gc.freeze``), so the collector's full passes, which stop every
    stream while they run, no longer walk them; for a process that runs one server.

    Limits that protect the server (docs/protocol.md, Limits): ``max_connections_per_address``
    open connections from one client IP (None: no limit; behind a proxy every client has the
    proxy's address), beyond that ``too_many_connections``; ``max_frames_per_second`` frames
    a connection may send per second on average (a token bucket holding one second's worth;
    None: no limit), beyond that ``rate_limited``; ``handshake_timeout`` for hello + auth.
    ``drain_timeout``: how long :meth:`RunningServer.drain` lets answers in flight finish.
    ``reuse_port``: listen with SO_REUSEPORT, so several processes share the ports
    (``ws``, ``wss``, ``quic``; docs/deployment.md).
    """

    listen: Sequence[str]
    tokens: Collection[str]
    backend: Backend
    ssl_context: ssl.SSLContext | None = None
    cert_file: str | None = None
    key_file: str | None = None
    parallel: int = 1
    max_queue: int = 256
    max_streams_per_connection: int = 16
    max_frame_size: int = _transports.DEFAULT_MAX_FRAME_SIZE
    heartbeat_interval: float = 15.0  # the server pings each client this often
    idle_timeout: float = 60.0  # a connection silent this long (no frame, not even a pong) is closed
    handshake_timeout: float = 10.0  # hello + auth must arrive within this
    scheduler: str = "fcfs"  # a name in SCHEDULERS
    cost_per_prompt_token: float = 0.0  # added to the backend's own cost in each done frame
    cost_per_generated_token: float = 0.0
    metrics_listen: str | None = None
    freeze_gc: bool = False  # once listening: gc.collect() then gc.freeze() (see serve)
    max_connections_per_address: int | None = None
    max_frames_per_second: float | None = 1000.0
    drain_timeout: float = 30.0
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.listen, str) or not self.listen:
            raise ConfigurationError("listen must be a non-empty list of URLs")
        if isinstance(self.tokens, str) or not self.tokens or not all(self.tokens):
            raise ConfigurationError("tokens must be a non-empty collection of non-empty strings")
        object.__setattr__(self, "listen", tuple(self.listen))
        object.__setattr__(self, "tokens", frozenset(self.tokens))
        for name in ("parallel", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_queue < 0:
            raise ConfigurationError(f"max_queue must be >= 0, got {self.max_queue!r}")
        if self.max_frame_size < 1024:
            raise ConfigurationError(f"max_frame_size must be >= 1024, got {self.max_frame_size!r}")
        if self.max_connections_per_address is not None and self.max_connections_per_address < 1:
            raise ConfigurationError(f"max_connections_per_address must be >= 1 or None, got {self.max_connections_per_address!r}")
        if self.max_frames_per_second is not None and not (1 <= self.max_frames_per_second < math.inf):
            raise ConfigurationError(f"max_frames_per_second must be >= 1 and finite, or None, got {self.max_frames_per_second!r}")
        if not 0 <= self.drain_timeout < math.inf:
            raise ConfigurationError(f"drain_timeout must be >= 0 and finite, got {self.drain_timeout!r}")
        if self.reuse_port:
            for url in self.listen:
                scheme = url.split(":", 1)[0].lower()
                if scheme not in _transports.REUSE_PORT_SCHEMES:
                    raise ConfigurationError(f"reuse_port: {url!r} cannot share its port with other processes "
                                             f"(only {', '.join(sorted(_transports.REUSE_PORT_SCHEMES))})")  # fmt: skip
        for name in ("heartbeat_interval", "idle_timeout", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigurationError(f"unknown scheduler {self.scheduler!r}; known: {', '.join(sorted(SCHEDULERS))}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("give both cert_file and key_file, or neither")
        if self.ssl_context is not None and self.cert_file is not None:
            raise ConfigurationError("give ssl_context or cert_file/key_file, not both")
        if self.metrics_listen is not None:
            parse_host_port(self.metrics_listen)


def backend_admission(backend: Backend) -> tuple[int, int]:
    """The ``parallel`` and ``max_queue`` a server gives ``backend``: the answers it takes in at
    once (its own ``parallel``, else 1), and no queue in front of a backend that orders its
    waiting answers itself (``schedules_waiting``: a batched backend's step scheduler; a server
    queue would only hide them from it), else the default queue."""
    parallel = int(getattr(backend, "parallel", 1))
    return parallel, 0 if getattr(backend, "schedules_waiting", False) else ServerConfig.max_queue


@dataclasses.dataclass(frozen=True)
class ServerStatistics:
    """A snapshot of a server's counters (since it started) and gauges (now)."""

    connections_accepted: int
    connections_open: int
    auth_failures: int  # connections refused for a wrong or missing token
    protocol_errors: int  # connections closed for malformed/oversized frames, bad streams, timeouts
    streams_started: int  # answers that reached the backend
    streams_completed: int  # answers that ended with a done frame (finish stop/length)
    streams_cancelled: int  # answers stopped by a cancel frame or a vanished client
    streams_failed: int  # answers that ended with an error frame (after or before the backend)
    tokens_generated: int  # tokens the backend produced, delivered or not
    queued: int  # answers waiting for the backend now
    running: int  # answers in the backend now
    connections_limited: int = 0  # connections refused or closed by a limit (per address, frame rate)
    draining: bool = False  # drain() has begun: no new connections or answers


@dataclasses.dataclass
class _Counters:
    connections_accepted: int = 0
    connections_open: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    streams_failed: int = 0
    tokens_generated: int = 0
    connections_limited: int = 0


class Scheduler(Protocol):
    """Decides when an answer may enter the backend (the server-side scheduling seam)."""

    def admit(self, request: GenerationRequest) -> AbstractAsyncContextManager[None]:
        """Wait for ``request``'s turn and hold it for the block. Raises
        EndpointError(code="overloaded") when too many wait. Cancellation leaves the queue."""
        ...

    @property
    def queued(self) -> int: ...

    @property
    def running(self) -> int: ...


class FcfsScheduler:
    """First come, first served: ``slots`` answers at a time, at most ``max_queue`` waiting."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self._limiter = trio.CapacityLimiter(slots)  # wakes waiters in FIFO order
        self._max_queue = max_queue
        self._queued = 0

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return int(self._limiter.borrowed_tokens)

    @asynccontextmanager
    async def admit(self, request: GenerationRequest) -> AsyncIterator[None]:
        if self._limiter.available_tokens == 0 and self._queued >= self._max_queue:
            running = int(self._limiter.total_tokens)
            raise EndpointError(f"the server is full ({running} answers in the backend, {self._queued} waiting)",
                                code=Code.OVERLOADED)  # fmt: skip
        self._queued += 1
        try:
            await self._limiter.acquire()
        finally:
            self._queued -= 1
        try:
            yield
        finally:
            self._limiter.release()


SCHEDULERS: dict[str, Callable[[int, int], Scheduler]] = {"fcfs": FcfsScheduler}
"""Server-side schedulers by name: ``factory(slots, max_queue)``."""


@dataclasses.dataclass(frozen=True)
class RunningServer:
    """What ``nursery.start(serve, config)`` returns: where it listens and how it is doing."""

    listeners: tuple[_transports.ListenerInfo, ...]
    _counters: _Counters = dataclasses.field(repr=False)
    _scheduler: Scheduler = dataclasses.field(repr=False)
    metrics: ServerMetrics = dataclasses.field(repr=False)
    metrics_listener: HttpListener | None = None  # where /metrics and /healthz are served
    _life: _Life | None = dataclasses.field(default=None, repr=False)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(info.url for info in self.listeners)

    def statistics(self) -> ServerStatistics:
        return _snapshot(self._counters, self._scheduler, self._life)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop gracefully: accept no new connections and no new answers, let the answers in
        flight finish for up to ``timeout`` seconds (None: the config's ``drain_timeout``),
        then close every connection left with ``shutting_down`` (a pydisco client fails over,
        keeping the tokens it has). Returns once every connection is closed; ``serve`` then
        returns. Calling it again while a drain runs waits for that drain (a shorter
        ``timeout`` ends it sooner). Cancel ``serve`` to stop at once instead."""
        assert self._life is not None
        await self._life.drain(timeout)

    async def wait_drained(self) -> None:
        """Wait until a drain (begun by anyone) has closed every connection."""
        assert self._life is not None
        await self._life.drained.wait()

    def health(self) -> tuple[int, str, bytes]:
        """``/healthz``: 200 and a few figures while the server serves, 503 while it drains
        (a load balancer stops sending it clients)."""
        s = self.statistics()
        body = {"status": "draining" if s.draining else "serving", "listeners": list(self.urls),
                "connections_open": s.connections_open, "queued": s.queued, "running": s.running,
                "streams_started": s.streams_started, "pid": os.getpid()}  # fmt: skip
        return (503 if s.draining else 200), "application/json", (json.dumps(body) + "\n").encode()

    def _metrics_page(self) -> tuple[int, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST

        return 200, CONTENT_TYPE_LATEST, self.metrics.exposition()


def _snapshot(counters: _Counters, scheduler: Scheduler, life: _Life | None = None) -> ServerStatistics:
    return ServerStatistics(**dataclasses.asdict(counters), queued=scheduler.queued, running=scheduler.running,
                            draining=life is not None and life.draining)  # fmt: skip


class _Life:
    """What every session of one server shares: the open sessions, connections per address,
    and the drain."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.draining = False
        self.sessions: set[_Session] = set()
        self.per_address: collections.Counter[str] = collections.Counter()
        self.stop_accepting: list[Callable[[], None]] = []
        self.drained = trio.Event()  # every connection closed after a drain: serve returns
        self._changed = trio.Event()
        self._deadline = math.inf

    def left(self, session: _Session) -> None:
        self.sessions.discard(session)
        self._changed.set()
        self._changed = trio.Event()

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d connections open", len(self.sessions))
        for stop in self.stop_accepting:
            stop()
        for session in list(self.sessions):
            session.drain_begun()

    async def drain(self, timeout: float | None) -> None:
        self.begin_drain()
        limit = self.config.drain_timeout if timeout is None else timeout
        self._deadline = min(self._deadline, trio.current_time() + limit)
        while self.sessions and trio.current_time() < self._deadline:
            with trio.move_on_at(self._deadline):
                await self._changed.wait()
        if self.sessions:
            log.info("drain deadline: closing %d connections", len(self.sessions))
            for session in list(self.sessions):
                session.close_soon(Code.SHUTTING_DOWN, "the server is shutting down (drain deadline)")
            with trio.move_on_after(_FLUSH_TIMEOUT + 2 * _SHUTDOWN_NOTICE):
                while self.sessions:
                    await self._changed.wait()
        self.drained.set()


async def serve(config: ServerConfig, *, task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every URL of ``config`` and serve until cancelled or drained.

    Reports a :class:`RunningServer` once every listener is up. Raises ConfigurationError for
    a bad config, OSError if a listener cannot bind. On cancellation each connected client is
    told ``shutting_down`` (best effort, briefly) and dropped; after
    :meth:`RunningServer.drain` it returns.
    """
    plans = [_listener_plan(url, config) for url in config.listen]
    counters = _Counters()
    scheduler = SCHEDULERS[config.scheduler](config.parallel, config.max_queue)
    life = _Life(config)
    metrics = ServerMetrics(functools.partial(_snapshot, counters, scheduler, life), trio.current_time)
    handler = functools.partial(_serve_connection, config, scheduler, counters, metrics, life)
    try:
        async with trio.open_nursery() as nursery:
            listeners = []
            for url, context in plans:
                info: _transports.ListenerInfo = await nursery.start(
                    functools.partial(
                        _transports.serve,
                        handler,
                        url,
                        ssl_context=context,
                        max_frame_size=config.max_frame_size,
                        reuse_port=config.reuse_port,
                    )
                )
                listeners.append(info)
                if info.stop_accepting is not None:
                    life.stop_accepting.append(info.stop_accepting)
                log.info("listening on %s", info.url)
            running = RunningServer(tuple(listeners), counters, scheduler, metrics, _life=life)
            if config.metrics_listen is not None:
                host, port = parse_host_port(config.metrics_listen)
                routes = {"/metrics": running._metrics_page, "/healthz": running.health}
                try:
                    where: HttpListener = await nursery.start(serve_http, host, port, routes)
                except OSError as e:
                    raise ConfigurationError(f"cannot serve metrics on {config.metrics_listen}: {e.strerror or e}") from e
                running = dataclasses.replace(running, metrics_listener=where)
                log.info("metrics on %s/metrics", where.url)
            if config.freeze_gc:
                gc.collect()
                gc.freeze()
            task_status.started(running)
            await life.drained.wait()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_exception(group) from None


def _listener_plan(url: str, config: ServerConfig) -> tuple[str, ssl.SSLContext | None]:
    try:
        scheme, _, _ = _transports.split_url(url)
        _transports.get_transport(scheme)
    except (ValueError, _transports.UnknownTransportError) as e:
        raise ConfigurationError(f"cannot listen on {url!r}: {e}") from e
    if scheme in PLAIN_SCHEMES:
        return url, None
    context = config.ssl_context
    if context is None and config.cert_file is not None and config.key_file is not None:
        context = server_ssl_context(Credentials.from_files(config.cert_file, config.key_file))
    if context is None:
        raise ConfigurationError(f"{scheme}:// needs TLS: give ssl_context or cert_file and key_file")
    return url, context


# -- one connection -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Frame:
    stream_id: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class _TokenOut:
    stream_id: int
    piece: TokenPiece
    generated_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class _DoneOut:
    stream_id: int
    result: GenerationResult


@dataclasses.dataclass(frozen=True, slots=True)
class _ErrorOut:
    stream_id: int
    code: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class _PausedOut:
    stream_id: int


class _Flush:
    """Writer: everything before this is sent; stop."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Goodbye:
    """Writer: everything before this is sent; close the connection with ``code``, stop."""

    code: str
    message: str


_Out = Union[_Frame, _TokenOut, _PausedOut, _DoneOut, _ErrorOut, _Flush, _Goodbye]


async def _serve_connection(
    config: ServerConfig, scheduler: Scheduler, counters: _Counters, metrics: ServerMetrics, life: _Life,
    connection: _transports.FrameConnection,
) -> None:  # fmt: skip
    host = _transports.remote_host(connection)
    limit = config.max_connections_per_address
    if life.draining:
        await _refuse(connection, Code.SHUTTING_DOWN, "the server is shutting down")
        return
    if limit is not None and host is not None and life.per_address[host] >= limit:
        counters.connections_limited += 1
        log.warning("refused a connection from %s: it has %d open already", host, life.per_address[host])
        await _refuse(connection, Code.TOO_MANY_CONNECTIONS, f"at most {limit} connections from one address")
        return
    counters.connections_accepted += 1
    counters.connections_open += 1
    if host is not None:
        life.per_address[host] += 1
    session = _Session(config, scheduler, counters, connection, metrics, life)
    life.sessions.add(session)
    try:
        await session.run()
    except Exception:  # a bug in one session must not stop the server
        log.exception("connection session failed")
    finally:
        counters.connections_open -= 1
        if host is not None:
            life.per_address[host] -= 1
            if not life.per_address[host]:
                del life.per_address[host]
        with trio.CancelScope(shield=True), trio.move_on_after(_SHUTDOWN_NOTICE):
            await connection.aclose()
        life.left(session)


async def _refuse(connection: _transports.FrameConnection, code: str, message: str) -> None:
    """Turn a connection away before its handshake: an error on stream 0 (briefly), then close."""
    with trio.CancelScope(shield=True), trio.move_on_after(_SHUTDOWN_NOTICE):
        try:
            await connection.send_frame(CONNECTION_STREAM, encode(Error(code, message)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await connection.aclose()


class _FrameBucket:
    """A token bucket over received frames: ``rate`` per second on average, bursts of one
    second's worth."""

    __slots__ = ("_rate", "_level", "_at")

    def __init__(self, rate: float, now: float) -> None:
        self._rate = rate
        self._level = rate
        self._at = now

    def take(self, now: float) -> bool:
        level = min(self._rate, self._level + (now - self._at) * self._rate)
        self._at = now
        if level < 1.0 - 1e-9:  # the tolerance absorbs float rounding of "exactly 1/rate later"
            self._level = level
            return False
        self._level = level - 1.0
        return True


class _Session:
    """Reader, writer, heartbeat and answer tasks of one connection, sharing one protocol."""

    def __init__(
        self, config: ServerConfig, scheduler: Scheduler, counters: _Counters, connection: _transports.FrameConnection,
        metrics: ServerMetrics, life: _Life | None = None,
    ) -> None:  # fmt: skip
        self._config = config
        self._life = life
        rate = config.max_frames_per_second
        self._bucket = _FrameBucket(rate, trio.current_time()) if rate is not None else None
        self._nursery: trio.Nursery | None = None
        self._ending = False
        self._metrics = metrics
        self._scheduler = scheduler
        self._counters = counters
        self._conn = connection
        self._proto = ServerProtocol(
            check_token=_check_token(config.tokens),
            model=config.backend.model_id,
            max_frame_size=config.max_frame_size,
            max_streams=config.max_streams_per_connection,
            heartbeat_interval=config.heartbeat_interval,
            agent="pydisco-server",
        )
        # Unbounded on purpose: backends call the sink without waiting, and every answer is
        # bounded by max_tokens; a slow client only delays its own connection.
        self._out_send, self._out_receive = trio.open_memory_channel[_Out](math.inf)
        self._answers: dict[int, trio.CancelScope] = {}
        self._reports: dict[int, ReportBox] = {}  # each open answer's newest reader report
        self._flushed = trio.Event()
        self._peer_gone = False
        self._last_received = trio.current_time()
        self._cancel_all = trio.CancelScope()  # replaced by the session nursery's scope in run()

    async def run(self) -> None:
        """Serve the connection until it closes. A cancellation from outside is the server
        stopping: the client is told ``shutting_down`` (briefly), then Cancelled propagates."""
        try:
            try:
                async with trio.open_nursery() as nursery:
                    self._cancel_all = nursery.cancel_scope
                    self._nursery = nursery
                    if self._life is not None and self._life.draining:
                        self.drain_begun()  # the drain began while this connection was being accepted
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._watchdog)
                    await self._reader(nursery)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise single_exception(group) from None
        except trio.Cancelled:
            # Only the server stopping cancels a session from outside: its own ends (the
            # peer gone, a protocol error, a timeout) cancel its nursery, which absorbs that.
            await self._tell_shutdown()
            raise

    def drain_begun(self) -> None:
        """The server drains: a connection with no answer in flight closes now; the others
        when their last answer ends (new generate frames are refused meanwhile)."""
        if not self._answers:
            self._goodbye()

    def _goodbye(self) -> None:
        """Close gracefully: once the writer has sent everything queued before (an answer's
        last tokens and its done frame), ``shutting_down`` on stream 0."""
        if not self._ending:
            self._ending = True
            self._out_send.send_nowait(_Goodbye(Code.SHUTTING_DOWN, "the server is shutting down"))

    def close_soon(self, code: str, message: str) -> None:
        """Close the connection with ``code`` on stream 0 now (answers in flight are
        cancelled; what is still queued for them is not sent)."""
        if self._nursery is not None and (not self._ending or code == Code.SHUTTING_DOWN):
            self._ending = True
            self._nursery.start_soon(self._end, code, message)

    async def _end(self, code: str, message: str) -> None:
        for out in self._proto.fail(code, message):
            if isinstance(out, Send):
                self._out_send.send_nowait(_Frame(out.stream_id, out.data))
            elif isinstance(out, CloseConnection):
                await self._close(out)
        self._cancel_all.cancel()  # the reader is still waiting for a frame

    async def _tell_shutdown(self) -> None:
        """The server is stopping: say so on stream 0, briefly, unless the peer is gone or
        the connection was closed for another reason already."""
        if self._peer_gone or self._proto.state is ServerState.CLOSED:
            return
        for out in self._proto.fail(Code.SHUTTING_DOWN, "the server is shutting down"):
            if isinstance(out, Send):
                with trio.CancelScope(shield=True), trio.move_on_after(_SHUTDOWN_NOTICE):
                    try:
                        await self._conn.send_frame(out.stream_id, out.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

    # Reading -----------------------------------------------------------------------------

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            outputs: list[ServerOutput] = []
            try:
                stream_id, data = await self._conn.receive_frame()
            except _transports.FrameTooLarge as e:
                outputs.extend(self._proto.frame_too_large())
                log.info("closing a connection: %s", e)
            except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._gone("reading", e)
                return
            else:
                now = self._last_received = trio.current_time()
                if self._bucket is not None and not self._bucket.take(now):
                    rate = self._config.max_frames_per_second
                    outputs.extend(self._proto.fail(Code.RATE_LIMITED, f"more than {rate:g} frames per second"))
                else:
                    outputs.extend(self._proto.receive(stream_id, data))
            for out in outputs:
                if isinstance(out, Send):
                    self._out_send.send_nowait(_Frame(out.stream_id, out.data))
                elif isinstance(out, StartStream):
                    if self._life is not None and self._life.draining:
                        # Refused like any stream error: a pydisco client fails over.
                        refusal = self._proto.stream_error(out.stream_id, Code.SHUTTING_DOWN,
                                                           "the server is shutting down: no new answers")  # fmt: skip
                        if refusal is not None:
                            self._out_send.send_nowait(_Frame(out.stream_id, refusal))
                        if not self._answers:
                            self._goodbye()
                        continue
                    scope = trio.CancelScope()
                    self._answers[out.stream_id] = scope
                    self._reports[out.stream_id] = ReportBox()
                    nursery.start_soon(self._answer, out.stream_id, out.request, out.reading_rate, scope)
                elif isinstance(out, ReaderReported):
                    self._take_report(out)
                elif isinstance(out, CancelStream):
                    scope_to_cancel = self._answers.get(out.stream_id)
                    if scope_to_cancel is not None:
                        scope_to_cancel.cancel()
                elif isinstance(out, CloseConnection):
                    await self._close(out)
                    return
                elif isinstance(out, Authenticated):
                    log.info("a client authenticated")

    def _take_report(self, out: ReaderReported) -> None:
        box = self._reports.get(out.stream_id)
        if box is None:
            return  # the answer ended while the report was on its way
        r = out.report  # the decoder checked its fields
        box.put(BufferReport(r.buffered_tokens, r.reading_rate_tps, r.received))

    async def _close(self, reason: CloseConnection) -> None:
        if reason.code == Code.UNAUTHORIZED:
            self._counters.auth_failures += 1
            log.warning("refused a client: %s", reason.message)
        elif reason.code == Code.SHUTTING_DOWN:
            log.debug("closing a connection: %s", reason.message)
        elif reason.code == Code.RATE_LIMITED:
            self._counters.connections_limited += 1
            log.warning("closing a connection: %s", reason.message)
        else:
            self._counters.protocol_errors += 1
            log.info("closing a connection (%s): %s", reason.code, reason.message)
        for scope in self._answers.values():
            scope.cancel()
        self._out_send.send_nowait(_Flush())
        with trio.move_on_after(_FLUSH_TIMEOUT):
            await self._flushed.wait()

    # Writing -----------------------------------------------------------------------------

    async def _writer(self) -> None:
        """Sends what the session queued. Natural batching: after waiting for the first item it
        takes everything else already queued (no timer: alone, an item leaves at once), merges
        each stream's consecutive tokens into ``tokens`` frames (version 3) and hands the whole
        batch to the transport as one write."""
        receive = self._out_receive
        try:
            while True:
                try:
                    items = [await receive.receive()]
                except trio.EndOfChannel:
                    break
                while len(items) < _WRITE_BATCH:
                    try:
                        items.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                frames, ends, stop = self._encode(items)
                if frames or ends:
                    await _transports.send_frames(self._conn, frames, ends)
                if isinstance(stop, _Goodbye):
                    await self._say_goodbye(stop)
                if stop is not None:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            # The client is gone: stop every answer now rather than at the next read.
            self._gone("sending", e)
            self._cancel_all.cancel()
        finally:
            self._flushed.set()

    def _encode(self, items: list[_Out]) -> tuple[list[tuple[int, bytes]], list[int], _Flush | _Goodbye | None]:
        """The frames for ``items`` in order (each stream's tokens merged where its first one
        was), the streams to end after them, and the ``_Flush`` or ``_Goodbye`` that came, if
        one did (nothing after it is sent; a goodbye goes out after the frames before it)."""
        proto = self._proto
        now = time.monotonic_ns()
        slots: list[list[tuple[int, bytes]]] = []  # a run of tokens fills its slot when it closes
        runs: dict[int, tuple[list[tuple[int, bytes]], list[TokenPiece], list[int]]] = {}
        ends: list[int] = []
        stop: _Flush | _Goodbye | None = None

        def close_run(sid: int) -> None:
            slot, pieces, times = runs.pop(sid)
            slot.extend((sid, data) for data in proto.tokens(sid, pieces, times, now))

        for item in items:
            if isinstance(item, (_Flush, _Goodbye)):
                stop = item
                break
            sid = item.stream_id
            if isinstance(item, _TokenOut):
                run = runs.get(sid)
                if run is None:
                    run = runs[sid] = ([], [], [])
                    slots.append(run[0])
                run[1].append(item.piece)
                run[2].append(item.generated_ns)
                continue
            if sid in runs:
                close_run(sid)  # its tokens before this frame, which may end the stream
            if isinstance(item, _PausedOut):
                data = proto.paused(sid)
            elif isinstance(item, _DoneOut):
                data = proto.done(sid, item.result, now)
            elif isinstance(item, _ErrorOut):
                data = proto.stream_error(sid, item.code, item.message)
            else:
                data = item.data
            if data is None:
                continue  # the stream was cancelled or closed meanwhile
            slots.append([(sid, data)])
            # Anything but a token or a pause on an answer's stream is its last frame (done, or
            # an error; the protocol only emits refusals as plain frames there).
            if not isinstance(item, _PausedOut) and sid != CONNECTION_STREAM:
                ends.append(sid)
        for sid in list(runs):
            close_run(sid)
        return [frame for slot in slots for frame in slot], ends, stop

    async def _say_goodbye(self, goodbye: _Goodbye) -> None:
        for out in self._proto.fail(goodbye.code, goodbye.message):
            if isinstance(out, Send):
                await self._conn.send_frame(out.stream_id, out.data)
        log.debug("closed a connection: %s", goodbye.message)
        self._cancel_all.cancel()  # the reader is still waiting for a frame

    def _gone(self, doing: str, error: BaseException) -> None:
        # A client that leaves, however it leaves, is ordinary: no warning, nothing more sent.
        if not self._peer_gone:
            self._peer_gone = True
            log.debug("the client went away (seen while %s: %s)", doing, error or type(error).__name__)

    async def _watchdog(self) -> None:
        """Pings the client every heartbeat interval and closes the connection when the
        handshake takes too long or the client goes silent (a separate task: a timeout around
        every receive would cost a cancel scope per frame)."""
        config = self._config
        opened = trio.current_time()
        next_ping = opened + config.heartbeat_interval
        while self._proto.state is not ServerState.CLOSED:
            ready = self._proto.state is ServerState.READY
            deadline = (self._last_received + config.idle_timeout) if ready else (opened + config.handshake_timeout)
            now = trio.current_time()
            if now >= deadline:
                what = "send anything (not even a pong)" if ready else "finish the handshake"
                limit = config.idle_timeout if ready else config.handshake_timeout
                self._ending = True
                await self._end(Code.TIMEOUT, f"the client did not {what} within {limit:g} s")
                return
            if now >= next_ping:
                self._out_send.send_nowait(_Frame(CONNECTION_STREAM, self._proto.ping()))
                next_ping = now + config.heartbeat_interval
            await trio.sleep_until(min(next_ping, deadline))

    # Answering ---------------------------------------------------------------------------

    async def _answer(self, sid: int, request: GenerationRequest, reading_rate: float | None,
                      scope: trio.CancelScope) -> None:  # fmt: skip
        ANSWER_ID.set(request.request_id or None)  # the client's answer id: one id on both sides
        counters = self._counters
        produced = 0
        asked_at, ahead = trio.current_time(), self._scheduler.queued
        timer = self._metrics.answer()  # TTFT from now: the server's queue counts

        def send_token(piece: TokenPiece) -> None:
            nonlocal produced
            produced += 1
            timer.token()
            counters.tokens_generated += 1
            self._out_send.send_nowait(_TokenOut(sid, piece, time.monotonic_ns()))

        sink = StreamSink(send_token, lambda: self._out_send.send_nowait(_PausedOut(sid)), self._reports[sid], reading_rate)

        out: _Out
        try:
            with scope:
                async with self._scheduler.admit(request):
                    log.info("admitted on stream %d after %.1f ms (%d waiting before it)", sid,
                             (trio.current_time() - asked_at) * 1e3, ahead)  # fmt: skip
                    counters.streams_started += 1
                    result = await self._config.backend.generate(request, sink)
                out = _DoneOut(sid, self._priced(result))
            if scope.cancelled_caught:
                counters.streams_cancelled += 1
                out = _DoneOut(sid, GenerationResult("cancelled", 0, 0, produced))
            elif result.finish_reason == "cancelled":
                counters.streams_cancelled += 1
            else:
                counters.streams_completed += 1
        except trio.Cancelled:  # the client vanished or the server is stopping
            counters.streams_cancelled += 1
            raise
        except Exception as e:  # the backend's failure ends this answer only
            counters.streams_failed += 1
            code, message = _error_code(e)
            if code == Code.INTERNAL:
                log.exception("answer on stream %d failed", sid)
            elif code in (Code.OVERLOADED, Code.REJECTED):
                log.warning("refused stream %d: %s", sid, message)
            else:
                log.info("answer on stream %d failed (%s): %s", sid, code, message)
            out = _ErrorOut(sid, code, message)
        finally:
            self._answers.pop(sid, None)
            self._reports.pop(sid, None)
        self._out_send.send_nowait(out)
        if self._life is not None and self._life.draining and not self._answers:
            self._goodbye()

    def _priced(self, result: GenerationResult) -> GenerationResult:
        c = self._config
        extra = c.cost_per_prompt_token * result.prefilled_tokens + c.cost_per_generated_token * result.generated_tokens
        return dataclasses.replace(result, cost_units=result.cost_units + extra) if extra else result


class StreamSink:
    """The sink a backend's ``generate`` gets from the server: each token to the client's
    stream, and what the client said of its reader, for a backend that schedules by it
    (``BatchedBackend``): ``reading_rate`` from the generate frame (None: not given) and
    ``reader_reports``, holding the newest ``reader_report``. ``paused()``: the backend paused
    the answer for others (the client hears a ``paused`` frame)."""

    __slots__ = ("_send", "_pause", "reader_reports", "reading_rate")

    def __init__(self, send: Callable[[TokenPiece], None], pause: Callable[[], None], reports: ReportBox,
                 reading_rate: float | None) -> None:  # fmt: skip
        self._send = send
        self._pause = pause
        self.reader_reports = reports
        self.reading_rate = reading_rate

    def __call__(self, piece: TokenPiece) -> None:
        self._send(piece)

    def paused(self) -> None:
        self._pause()


def _check_token(tokens: Collection[str]) -> Callable[[str], bool]:
    encoded = [t.encode("utf-8") for t in tokens]

    def check(candidate: str) -> bool:
        given = candidate.encode("utf-8", "surrogateescape")
        # Compare with every accepted token, so timing says nothing about which one nearly matched.
        return sum(hmac.compare_digest(given, t) for t in encoded) > 0

    return check


def _error_code(e: Exception) -> tuple[str, str]:
    if isinstance(e, PromptTooLongError):
        return Code.PROMPT_TOO_LONG, str(e)
    if isinstance(e, EndpointError):
        return (e.code if e.code in ERROR_CODES else Code.INTERNAL), str(e)
    if isinstance(e, (ConfigurationError, ValueError)):
        return Code.BAD_REQUEST, str(e)
    return Code.INTERNAL, f"internal error ({type(e).__name__})"
