"""The Zenoh transport (scheme ``zenoh``): frames on numbered streams over Zenoh pub/sub, so the
device–cloud link can ride a robot's existing Zenoh network (docs/protocol.md, "Zenoh").

``zenoh://HOST:PORT`` names the Zenoh endpoint ``tcp/HOST:PORT``: the server's session (peer
mode) listens there; a client's session (client mode, one per connection) connects there — to
the server itself, or to a Zenoh router whose network reaches the server. Multicast scouting is
off on both: a link goes only where its URL says.

Key expressions, under the service key ``pydisco/cloud``::

    pydisco/cloud/open                 queryable (server): payload = a new connection's id
    pydisco/cloud/server/<zid>         liveliness token of the serving session
    pydisco/cloud/conn/<id>/up         client -> server frames
    pydisco/cloud/conn/<id>/down       server -> client frames
    pydisco/cloud/conn/<id>/client     liveliness token of the client's session

Each sample is one frame: the stream id as 4 bytes big-endian, then the frame, as on WebSocket.
An empty sample says "no more frames" (a clean close, read as ``EndOfChannel``); the single byte
``00`` says the sender dropped the connection (``BrokenResourceError``). One publisher per
direction, reliable, so frames arrive in the order they were sent. A peer whose session goes
away (a crash, a lost link after Zenoh's lease) is seen through its liveliness token and
surfaces as ``BrokenResourceError``; the protocol's heartbeat covers a server that stops
answering without its session going away.

Zenoh calls back on its own threads: each sample is copied there and handed to the Trio run
with ``TrioToken.run_sync_soon``, so nothing touches Trio state off its thread. A put may wait
for Zenoh's queue (congestion control ``BLOCK``), so it runs in a worker thread, one at a time
per connection; opening and closing sessions do too.

``max_frame_size`` is enforced by the receiving side (``FrameTooLarge``, the connection stays
usable); Zenoh itself has received the whole sample by then. Its own limit, set here to a few
times the frame limit, bounds that: Zenoh drops a bigger sample silently (the frame is lost,
the connection stays up). Frames travel in the clear on ``tcp/``: authentication is
the protocol's (hello/auth); encrypt the Zenoh network itself (TLS links in the routers'
configuration) where it leaves the robot.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import math
import ssl
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio

from .._errors import ConfigurationError, MissingExtraError
from ._base import (
    DEFAULT_MAX_FRAME_SIZE,
    ConnectionHandler,
    FrameConnection,
    FrameTooLarge,
    ListenerInfo,
    open_envelope,
    seal_envelope,
)

try:
    import zenoh
except ImportError as _missing:  # the entry point is registered; the extra may not be installed
    raise MissingExtraError("the zenoh:// transport needs eclipse-zenoh", "zenoh") from _missing

log = logging.getLogger("pydisco.transports.zenoh")

SCHEME = "zenoh"
SERVICE = "pydisco/cloud"
_END = b""
_RESET = b"\x00"
_OPEN_TIMEOUT = 10.0  # a server that answers no open query within this is not there
_MATCH_TIMEOUT = 10.0  # the peer's subscriber must be known before the first frame
_SEND_TIMEOUT = 10.0  # a put Zenoh cannot queue in this long means a dead link
_CLOSE_TIMEOUT = 2.0
MAX_BACKLOG = 4096
"""Frames received and not yet read beyond which a connection is dropped (Zenoh has no flow
control from subscriber to publisher; this bounds what a flooding peer costs)."""


def _zenoh_rx_limit(max_frame_size: int) -> int:
    # Zenoh reassembles a sample whole; beyond this it drops the sample (measured: silently, the
    # link stays up). Frames between the frame limit and this get FrameTooLarge, as on WebSocket.
    return 4 * max_frame_size + 1024


def _endpoint(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"tcp/[{host}]:{port}" if is_v6 else f"tcp/{host}:{port}"


def _config(mode: str, *, listen: list[str], connect: list[str], max_frame_size: int) -> zenoh.Config:
    config = zenoh.Config()
    config.insert_json5("mode", json.dumps(mode))
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("listen/endpoints", json.dumps(listen))
    config.insert_json5("connect/endpoints", json.dumps(connect))
    config.insert_json5("transport/link/rx/max_message_size", str(_zenoh_rx_limit(max_frame_size)))
    return config


def _parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != SCHEME or not parts.hostname or port is None:
        raise ConfigurationError(f"expected zenoh://host:port, got {url!r}")
    return parts.hostname, port


def _publisher_options() -> dict[str, Any]:
    return dict(
        congestion_control=zenoh.CongestionControl.BLOCK,  # a frame is never dropped
        reliability=zenoh.Reliability.RELIABLE,
        express=True,  # a token is worth sending alone: no batching delay
    )


class _Poster:
    """Hands work from Zenoh's threads to the Trio run (``run_sync_soon``); a run that has
    ended takes nothing more."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()

    def __call__(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._token.run_sync_soon(_guarded, fn, args)
        except trio.RunFinishedError:
            pass


def _guarded(fn: Callable[..., object], args: tuple[object, ...]) -> None:
    # An exception escaping a run_sync_soon callback is a TrioInternalError that ends the run.
    try:
        fn(*args)
    except Exception:
        log.exception("handling a Zenoh callback failed")


@dataclasses.dataclass(frozen=True)
class _Lost:
    """The peer is gone: why, and whether it said goodbye."""

    reason: str
    clean: bool


class ZenohConnection:
    """One side of a zenoh:// connection (meets ``transports._base.FrameConnection``).

    Received samples arrive in Trio (``_deliver``, ``_peer_lost``) from Zenoh's threads through
    a ``_Poster``; ``release`` is what closing does beyond saying goodbye (a client closes its
    session, the server undeclares the connection's publisher)."""

    def __init__(self, publisher: Any, max_frame_size: int, label: str, release: Callable[[], None]) -> None:
        self.label = label
        self._publisher = publisher
        self._max_frame_size = max_frame_size
        self._release = release
        self._send_limiter = trio.CapacityLimiter(1)  # one put at a time: frames keep their order
        self._inbox_send, self._inbox = trio.open_memory_channel[bytes | _Lost](math.inf)
        self._lost: _Lost | None = None  # what the reader has been told, once it has
        self._peer_gone = False  # set as soon as anything says so: sends then fail
        self._closed = False
        self._kept: list[object] = []

    def keep(self, entity: object) -> None:
        """Hold a Zenoh entity (a liveliness token) as long as the connection lives."""
        self._kept.append(entity)

    # -- from Zenoh (in the Trio thread) -------------------------------------------------

    def _deliver(self, payload: bytes) -> None:
        if self._peer_gone:
            return
        if payload == _END or payload == _RESET:
            self._peer_lost(_Lost("the peer closed the connection", clean=True) if payload == _END
                            else _Lost("the peer dropped the connection", clean=False))  # fmt: skip
            return
        if self._inbox_send.statistics().current_buffer_used >= MAX_BACKLOG:
            self._peer_lost(_Lost(f"more than {MAX_BACKLOG} frames unread: the peer floods", clean=False))
            return
        self._put(payload)

    def _peer_lost(self, lost: _Lost) -> None:
        if self._peer_gone:
            return
        self._peer_gone = True
        self._put(lost)

    def _put(self, item: bytes | _Lost) -> None:
        try:
            self._inbox_send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # closed locally: nobody reads

    # -- FrameConnection ----------------------------------------------------------------

    async def send_frame(self, stream_id: int, frame: bytes) -> None:
        """Send one frame (in a worker thread; a put is whole or not at all, and is not
        abandoned on cancellation). BrokenResourceError once the peer is gone, however cleanly."""
        if self._closed:
            raise trio.ClosedResourceError("this connection is closed")
        if self._peer_gone:
            raise trio.BrokenResourceError(f"{self.label}: the peer is gone")
        await self._send(seal_envelope(stream_id, frame))

    async def receive_frame(self) -> tuple[int, bytes]:
        """Next frame. EndOfChannel after the peer's clean close, BrokenResourceError after a
        drop or a lost session, FrameTooLarge for a frame over the limit (the connection stays
        usable). On cancellation nothing is lost: the frame stays queued."""
        if self._closed:
            raise trio.ClosedResourceError("this connection is closed")
        if self._lost is None:
            try:
                item = await self._inbox.receive()
            except trio.ClosedResourceError:  # closed by a concurrent aclose
                raise trio.ClosedResourceError("this connection is closed") from None
            if isinstance(item, bytes):
                return self._frame(item)
            self._lost = item
        if self._lost.clean:
            raise trio.EndOfChannel
        raise trio.BrokenResourceError(f"{self.label}: {self._lost.reason}")

    def _frame(self, payload: bytes) -> tuple[int, bytes]:
        return open_envelope(payload, self._max_frame_size)

    async def end_stream(self, stream_id: int) -> None:
        """Streams are virtual here: nothing to send."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Say goodbye (the peer reads what was sent, then EndOfChannel) and let go. Idempotent;
        bounded in time, shielded from cancellation."""
        await self._shut(_END)

    async def abort(self) -> None:
        """Drop the connection: the peer gets BrokenResourceError."""
        await self._shut(_RESET)

    async def _shut(self, goodbye: bytes) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._inbox.close()
        with trio.CancelScope(shield=True):
            if not self._peer_gone:
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    try:
                        await self._send(goodbye)
                    except trio.BrokenResourceError:
                        pass
            await trio.to_thread.run_sync(self._release)

    async def _send(self, payload: bytes) -> None:
        with trio.move_on_after(_SEND_TIMEOUT) as scope:
            try:
                await trio.to_thread.run_sync(self._publisher.put, payload, limiter=self._send_limiter)
            except zenoh.ZError as e:
                self._peer_lost(_Lost(f"Zenoh refused the frame: {e}", clean=False))
                raise trio.BrokenResourceError(f"{self.label}: Zenoh refused the frame: {e}") from None
        # A put is never abandoned (it is whole or not at all); what this bounds is the wait for
        # the connection's one thread slot behind an earlier put that Zenoh holds up.
        if scope.cancelled_caught:
            self._peer_lost(_Lost(f"no frame could be sent within {_SEND_TIMEOUT} s", clean=False))
            raise trio.BrokenResourceError(f"{self.label}: no frame could be sent within {_SEND_TIMEOUT} s")


async def _until_matched(publisher: Any) -> bool:
    """Wait until Zenoh knows a subscriber for ``publisher`` (a put before that is lost)."""
    with trio.move_on_after(_MATCH_TIMEOUT):
        while not publisher.matching_status.matching:
            await trio.sleep(0.002)
        return True
    return False


def _close_quietly(session: zenoh.Session) -> None:
    try:
        session.close()  # type: ignore[no-untyped-call]  # unannotated in zenoh's stub
    except zenoh.ZError:
        pass


# -- client ----------------------------------------------------------------------------------


async def _connect(url: str, max_frame_size: int) -> ZenohConnection:
    host, port = _parse_url(url)
    endpoint = _endpoint(host, port)
    config = _config("client", listen=[], connect=[endpoint], max_frame_size=max_frame_size)
    try:
        session = await trio.to_thread.run_sync(zenoh.open, config)
    except zenoh.ZError as e:
        raise ConnectionRefusedError(f"no Zenoh node at {endpoint}: {e}") from None
    try:
        return await _open_connection(session, url, max_frame_size)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close_quietly, session)
        raise


async def _open_connection(session: zenoh.Session, url: str, max_frame_size: int) -> ZenohConnection:
    connection_id = uuid.uuid4().hex
    base = f"{SERVICE}/conn/{connection_id}"
    post = _Poster()
    # Declarations go through Zenoh's locks: made in worker threads, never on the Trio thread.
    publisher = await trio.to_thread.run_sync(lambda: session.declare_publisher(f"{base}/up", **_publisher_options()))
    connection = ZenohConnection(publisher, max_frame_size, url, release=lambda: _close_quietly(session))

    def declare_receiving() -> None:
        deliver = connection._deliver
        session.declare_subscriber(f"{base}/down", lambda sample: post(deliver, sample.payload.to_bytes()))
        # Kept on the connection: a token lives only as long as its object does (a subscriber
        # with a callback lives as long as the session).
        connection.keep(session.liveliness().declare_token(f"{base}/client"))

    await trio.to_thread.run_sync(declare_receiving)

    def on_open_reply() -> list[Any]:
        return list(session.get(f"{SERVICE}/open", payload=connection_id, timeout=_OPEN_TIMEOUT,
                                target=zenoh.QueryTarget.BEST_MATCHING))  # one server: see _Server.declare

    replies = await trio.to_thread.run_sync(on_open_reply, abandon_on_cancel=True)
    accepted = [r.ok for r in replies if r.ok is not None]
    refused = [r.err.payload.to_string() for r in replies if r.err is not None]
    if not accepted:
        why = f"it refused: {refused[0]}" if refused else f"no pydisco server answers on {SERVICE}"
        raise ConnectionRefusedError(f"{url}: {why}")
    server_zid = accepted[0].payload.to_string()

    def on_server(sample: zenoh.Sample) -> None:
        if sample.kind == zenoh.SampleKind.DELETE:
            post(connection._peer_lost, _Lost("the server's Zenoh session went away", clean=False))

    await trio.to_thread.run_sync(
        lambda: session.liveliness().declare_subscriber(f"{SERVICE}/server/{server_zid}", on_server, history=True)
    )
    if not await _until_matched(publisher):
        raise ConnectionRefusedError(f"{url}: the server's subscriber never became known")
    return connection


# -- server ----------------------------------------------------------------------------------


class _Server:
    """One serving session: accepts open queries and routes samples to their connections."""

    def __init__(self, session: zenoh.Session, handler: ConnectionHandler, nursery: trio.Nursery, max_frame_size: int) -> None:
        self.session = session
        self._handler = handler
        self._nursery = nursery
        self._max_frame_size = max_frame_size
        self._connections: dict[str, ZenohConnection] = {}
        self._post = _Poster()
        self._token: zenoh.LivelinessToken | None = None

    def declare(self) -> None:
        """The serving entities (blocking calls: run in a thread)."""
        post = self._post
        s = self.session
        # complete=True: a query aimed at the best match reaches one server, however many serve.
        s.declare_queryable(f"{SERVICE}/open", lambda query: post(self._nursery.start_soon, self._accept, query), complete=True)
        s.liveliness().declare_subscriber(f"{SERVICE}/conn/*/client", lambda sample: post(self._client_event, str(sample.key_expr), sample.kind))
        self._token = s.liveliness().declare_token(f"{SERVICE}/server/{s.zid()}")  # lives while referenced

    @staticmethod
    def _connection_id(key: str) -> str:
        return key[len(SERVICE) + len("/conn/") :].partition("/")[0]

    def _client_event(self, key: str, kind: zenoh.SampleKind) -> None:
        connection = self._connections.get(self._connection_id(key))
        if connection is not None and kind == zenoh.SampleKind.DELETE:
            connection._peer_lost(_Lost("the client's Zenoh session went away", clean=False))

    async def _accept(self, query: zenoh.Query) -> None:
        connection_id = query.payload.to_string() if query.payload is not None else ""
        if len(connection_id) != 32 or not all(c in "0123456789abcdef" for c in connection_id) \
                or connection_id in self._connections:  # fmt: skip
            await trio.to_thread.run_sync(lambda: query.reply_err(f"bad connection id {connection_id!r}"))
            return
        base = f"{SERVICE}/conn/{connection_id}"
        publisher = await trio.to_thread.run_sync(
            lambda: self.session.declare_publisher(f"{base}/down", **_publisher_options())
        )
        subscriber: list[zenoh.Subscriber[None]] = []

        def release() -> None:
            publisher.undeclare()  # type: ignore[no-untyped-call]  # unannotated in zenoh's stub
            for entity in subscriber:
                entity.undeclare()  # type: ignore[no-untyped-call]

        connection = ZenohConnection(publisher, self._max_frame_size, f"zenoh connection {connection_id}", release)
        self._connections[connection_id] = connection
        # Only the server that accepted the connection hears its frames.
        deliver = connection._deliver
        subscriber.append(await trio.to_thread.run_sync(
            lambda: self.session.declare_subscriber(f"{base}/up", lambda sample: self._post(deliver, sample.payload.to_bytes()))
        ))  # fmt: skip
        try:
            if not await _until_matched(publisher):  # the client's subscriber must be known first
                await trio.to_thread.run_sync(lambda: query.reply_err("the client's subscriber never became known"))
                await connection.abort()
                return
            await trio.to_thread.run_sync(lambda: query.reply(f"{SERVICE}/open", str(self.session.zid())))
            query.drop()  # type: ignore[no-untyped-call]  # the query is answered: the client stops waiting now, not at its timeout
            await _run_handler(self._handler, connection)
        finally:
            del self._connections[connection_id]


async def _run_handler(handler: ConnectionHandler, connection: ZenohConnection) -> None:
    # As a socket would: closed cleanly when the handler returns, dropped when it fails or the
    # server is cancelled.
    try:
        await handler(connection)
    except BaseException:
        await connection.abort()
        raise
    await connection.aclose()


class ZenohTransport:
    """The ``zenoh`` scheme. A TLS context is accepted and unused: secure the Zenoh network."""

    schemes = (SCHEME,)

    async def connect(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> FrameConnection:
        """Open a client connection: a Zenoh session connected to the URL's endpoint, then the
        open query. OSError (ConnectionRefusedError) when no Zenoh node is there or no pydisco
        server answers. Cancellation abandons the attempt and closes the session."""
        return await _connect(url, max_frame_size)

    async def serve(
        self,
        handler: ConnectionHandler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        task_status: trio.TaskStatus[ListenerInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``tcp/host:port`` (port 0: a free port is picked) until cancelled, running
        ``handler`` for each connection in its own task. OSError if the port cannot be bound.
        On cancellation every connection is dropped and the session closed."""
        session = await _open_listening(host, port, max_frame_size)
        try:
            bound_port = port or await trio.to_thread.run_sync(_listening_port, session)
            async with trio.open_nursery() as nursery:
                server = _Server(session, handler, nursery, max_frame_size)
                await trio.to_thread.run_sync(server.declare)
                task_status.started(ListenerInfo(SCHEME, host, bound_port))
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close_quietly, session)


async def _open_listening(host: str, port: int, max_frame_size: int) -> zenoh.Session:
    endpoint = _endpoint(host, port)
    config = _config("peer", listen=[endpoint], connect=[], max_frame_size=max_frame_size)
    if port == 0:
        # Zenoh says which port it bound only through its admin space (read-only by default).
        config.insert_json5("adminspace/enabled", "true")
    try:
        return await trio.to_thread.run_sync(zenoh.open, config)
    except zenoh.ZError as e:
        raise OSError(f"cannot listen on {endpoint}: {e}") from None


def _listening_port(session: zenoh.Session) -> int:
    """The port a session listening on port 0 bound, from its own admin space (blocking)."""
    key = f"@/{session.zid()}/peer"
    for reply in session.get(key, timeout=_OPEN_TIMEOUT):  # the key names this session: only it answers
        if reply.ok is not None:
            for locator in json.loads(reply.ok.payload.to_bytes()).get("locators", ()):
                _, _, port = str(locator).rpartition(":")
                if port.isdigit():
                    return int(port)
    raise OSError(f"the Zenoh session does not say which port it listens on ({key})")


transport = ZenohTransport()
