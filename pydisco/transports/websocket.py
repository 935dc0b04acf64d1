"""WebSocket transport (``ws://`` and ``wss://``) on trio-websocket.

WebSocket has no streams of its own, so each binary message is a small envelope: the stream id
as 4 bytes big-endian, then the frame. A message that cannot be an envelope (text, or shorter
than 4 bytes) is handed up as-is on stream 0, where the protocol layer rejects it as
``bad_frame`` like any other garbage.

Listening: the transport binds its own sockets (SO_REUSEPORT on request, so several processes
share a port) and runs its own accept loop, so a draining server can close the listening sockets
while the accepted connections go on (``ListenerInfo.stop_accepting``). TLS and the HTTP upgrade
must finish within 10 s of the TCP accept; the server's own handshake deadline follows.

Size limit: trio-websocket refuses a message over its ``max_message_size`` while receiving
fragments, closing with code 1009 (so memory stays bounded). It is set to twice the frame limit;
frames between the two limits are received and refused here with ``FrameTooLarge`` while the
connection stays open, so the server can still send its ``frame_too_large`` error frame.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from urllib.parse import urlsplit

import trio
import trio_websocket as tws
from wsproto.events import BytesMessage
from wsproto.utilities import LocalProtocolError

from ._base import (
    DEFAULT_MAX_FRAME_SIZE,
    ENVELOPE,
    ConnectionHandler,
    FrameConnection,
    FrameTooLarge,
    ListenerInfo,
    open_envelope,
    seal_envelope,
    set_remote_host,
)

_CLEAN_CLOSE = (1000, 1001)  # normal closure, going away
_TOO_BIG = 1009
_SEND_TIMEOUT = 10.0  # a shielded send that cannot finish in this long means a dead peer
_CLOSE_TIMEOUT = 2.0
_PATH = "/pydisco"

log = logging.getLogger("pydisco.transports.websocket")

# Several messages in one write needs trio-websocket's connection internals (checked against
# 0.11/0.12): its wsproto state, the lock around its stream, the stream. Without them (a
# changed trio-websocket) frames go one message per write, as before.
_INTERNALS = ("_wsproto", "_stream_lock", "_stream", "_close_reason", "_abort_web_socket")


def _ws_limit(max_frame_size: int) -> int:
    return 2 * max_frame_size + ENVELOPE.size


class WebSocketConnection:
    """A trio-websocket connection carrying enveloped frames (meets ``FrameConnection``)."""

    def __init__(self, ws: tws.WebSocketConnection, max_frame_size: int, on_close: trio.Event | None = None) -> None:
        self._ws = ws
        self._max_frame_size = max_frame_size
        self._closed_locally = False
        self._on_close = on_close
        self._batches = all(hasattr(ws, name) for name in _INTERNALS)

    async def send_frame(self, stream_id: int, frame: bytes) -> None:
        """Send one frame. The write is shielded (and bounded in time) so that cancellation never
        leaves half a WebSocket frame on the wire; a cancelled caller sees Cancelled after it.
        BrokenResourceError once the peer has closed, however cleanly: nobody will read it."""
        if self._closed_locally:
            raise trio.ClosedResourceError("this connection is closed")
        message = seal_envelope(stream_id, frame)
        # One scope, shielded and with a deadline (scopes cost on every token).
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _SEND_TIMEOUT) as scope:
            try:
                await self._ws.send_message(message)
            except tws.ConnectionClosed as e:
                raise self._closed_error(e, sending=True) from None
        if scope.cancelled_caught:
            await self._abort()
            raise trio.BrokenResourceError(f"the peer did not take a frame within {_SEND_TIMEOUT} s")
        await trio.lowlevel.checkpoint_if_cancelled()

    async def send_frames(self, frames: Sequence[tuple[int, bytes]], end: Collection[int] = ()) -> None:
        """Send several frames, each its own WebSocket message as ``send_frame`` would, but
        all in one write to the socket (one TLS record, one system call on ``wss``). ``end``
        is a no-op: streams are virtual here. Shielded and bounded like ``send_frame``."""
        if len(frames) == 1 or not self._batches:
            for stream_id, frame in frames:
                await self.send_frame(stream_id, frame)
            if not frames:
                await trio.lowlevel.checkpoint()
            return
        if self._closed_locally:
            raise trio.ClosedResourceError("this connection is closed")
        ws = self._ws
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _SEND_TIMEOUT) as scope:
            if ws._close_reason is not None:
                raise self._closed_error(tws.ConnectionClosed(ws._close_reason), sending=True)
            proto = ws._wsproto
            try:
                data = b"".join([proto.send(BytesMessage(data=seal_envelope(sid, frame))) for sid, frame in frames])
            except LocalProtocolError:  # closing: wsproto takes no more messages
                raise trio.BrokenResourceError("the connection is closing") from None
            async with ws._stream_lock:
                try:
                    await ws._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await ws._abort_web_socket()
                    raise self._closed_error(tws.ConnectionClosed(ws._close_reason), sending=True) from None
        if scope.cancelled_caught:
            await self._abort()
            raise trio.BrokenResourceError(f"the peer did not take a frame within {_SEND_TIMEOUT} s")
        await trio.lowlevel.checkpoint_if_cancelled()

    async def receive_frame(self) -> tuple[int, bytes]:
        """Next frame. EndOfChannel after a clean close (1000/1001), BrokenResourceError after any
        other close or a lost link, FrameTooLarge for a frame over the limit."""
        if self._closed_locally:
            raise trio.ClosedResourceError("this connection is closed")
        try:
            message = await self._ws.get_message()
        except tws.ConnectionClosed as e:
            raise self._closed_error(e) from None
        if isinstance(message, str):
            return 0, message.encode("utf-8", "surrogateescape")
        return open_envelope(message, self._max_frame_size)

    async def end_stream(self, stream_id: int) -> None:
        """Streams are virtual on WebSocket: nothing to send."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send a normal close (bounded wait for the peer's reply) and release the socket."""
        if self._closed_locally:
            await trio.lowlevel.checkpoint()
            return
        self._closed_locally = True
        try:
            with trio.move_on_after(_CLOSE_TIMEOUT):
                await self._ws.aclose()
        finally:
            if self._on_close is not None:
                self._on_close.set()

    async def _abort(self) -> None:
        self._closed_locally = True
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await self._ws.aclose(code=1011, reason="send timed out")
        if self._on_close is not None:
            self._on_close.set()

    def _closed_error(self, e: tws.ConnectionClosed, *, sending: bool = False) -> Exception:
        if self._closed_locally:
            return trio.ClosedResourceError("this connection is closed")
        reason = e.reason
        code = reason.code if reason is not None else None
        if code in _CLEAN_CLOSE:
            # A clean close ends what the peer sends; what we would send to it has nowhere to go.
            if sending:
                return trio.BrokenResourceError(f"the peer closed the connection (code {code})")
            return trio.EndOfChannel()
        if code == _TOO_BIG:
            detail = "the peer refused a message as too big (close code 1009)"
        elif reason is not None:
            detail = f"connection closed with code {reason.code} ({reason.name}) {reason.reason or ''}".rstrip()
        else:
            detail = "connection lost"
        return trio.BrokenResourceError(detail)


class WebSocketTransport:
    """The ``ws`` and ``wss`` schemes."""

    schemes = ("ws", "wss")

    async def connect(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> FrameConnection:
        """Open a client connection; OSError / trio.BrokenResourceError if it cannot be made.

        trio-websocket runs a reader task per connection, so the connection lives in a Trio
        system task that ends when the connection is closed (or the run ends). Cancelling the
        caller while connecting abandons the attempt.
        """
        parts = urlsplit(url)
        if parts.scheme not in self.schemes or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        if parts.scheme == "wss" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        runner = _ClientRunner(
            parts.hostname, port, parts.path or _PATH, ssl_context if parts.scheme == "wss" else None, max_frame_size
        )
        trio.lowlevel.spawn_system_task(runner.run, name=f"websocket client {url}")
        try:
            await runner.ready.wait()
        except BaseException:
            runner.cancel()
            raise
        if runner.error is not None:
            raise runner.error
        assert runner.connection is not None
        return runner.connection

    async def serve(
        self,
        handler: ConnectionHandler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        reuse_port: bool = False,
        task_status: trio.TaskStatus[ListenerInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept WebSocket connections (TLS when ``ssl_context`` is given) until cancelled.

        ``reuse_port``: set SO_REUSEPORT, so several processes share the port (the kernel
        spreads new connections over them). The reported ``ListenerInfo.stop_accepting``
        closes the listening sockets; the connections already accepted go on, and this
        returns once they have all ended.
        """
        sockets = await _listening_sockets(host, port, reuse_port)
        listeners: list[trio.SocketListener | trio.SSLListener[trio.SocketStream]] = [trio.SocketListener(s) for s in sockets]
        if ssl_context is not None:
            listeners = [trio.SSLListener(l, ssl_context, https_compatible=True) for l in listeners]  # type: ignore[arg-type]
        limit = _ws_limit(max_frame_size)

        async def on_stream(stream: trio.abc.Stream) -> None:
            # An exception here would stop the whole listener: keep it per connection.
            try:
                async with trio.open_nursery() as nursery:  # trio-websocket's reader task
                    ws: tws.WebSocketConnection | None = None
                    with trio.move_on_after(_UPGRADE_TIMEOUT):
                        try:
                            request = await tws.wrap_server_stream(nursery, stream, max_message_size=limit)
                            ws = await request.accept()
                        except (tws.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                            ws = None  # the client left during the handshake
                    if ws is None:
                        nursery.cancel_scope.cancel()
                        return
                    connection = WebSocketConnection(ws, max_frame_size)
                    remote = ws.remote
                    if isinstance(remote, tws.Endpoint):
                        set_remote_host(connection, str(remote.address))
                    try:
                        await handler(connection)
                    except Exception:
                        log.exception("connection handler failed; closing that connection only")
                    finally:
                        await connection.aclose()  # when the server is cancelled this drops the link at once
                    nursery.cancel_scope.cancel()
            except Exception:
                log.exception("a WebSocket connection failed outside its handler")
            finally:
                await trio.aclose_forcefully(stream)

        accepting = trio.CancelScope()
        try:
            async with trio.open_nursery() as connections:
                with accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(_accept_loop, listener, on_stream, connections)
                        scheme = "wss" if ssl_context is not None else "ws"
                        task_status.started(ListenerInfo(scheme, host, sockets[0].getsockname()[1], accepting.cancel))
                _close_listening(sockets)  # no longer accepting: free the port now, the connections go on
        finally:
            _close_listening(sockets)  # stopped (or cancelled): a restart may bind the port at once


def _close_listening(sockets: list[trio.socket.SocketType]) -> None:
    for sock in sockets:
        sock.close()  # idempotent; wakes a task waiting on it with ClosedResourceError


_UPGRADE_TIMEOUT = 10.0  # a client gets this long for TLS and the HTTP upgrade, then the server's own handshake deadline runs
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


async def _listening_sockets(host: str, port: int, reuse_port: bool) -> list[trio.socket.SocketType]:
    """Bound, listening TCP sockets for every address of ``host`` (port 0: one free port for all)."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE)
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, type_, proto, _, addr in infos:
            if family not in (trio.socket.AF_INET, trio.socket.AF_INET6):
                continue
            sock = trio.socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
            if family == trio.socket.AF_INET6:
                sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            await sock.bind(addr)
            sock.listen(_BACKLOG)
        if not sockets:
            raise OSError(f"no IPv4 or IPv6 address for {host!r}")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _accept_loop(listener: trio.abc.Listener[trio.abc.Stream], on_stream: Callable[[trio.abc.Stream], Awaitable[None]],
                       nursery: trio.Nursery) -> None:  # fmt: skip
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:
            if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error("cannot accept a connection (%s); trying again in 0.1 s", e.strerror or e)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(on_stream, stream)


class _ClientRunner:
    """Owns one client connection's nursery (trio-websocket's reader task) in a system task."""

    def __init__(self, host: str, port: int, path: str, ssl_context: ssl.SSLContext | None, limit: int) -> None:
        self._host, self._port, self._path, self._ssl, self._limit = host, port, path, ssl_context, limit
        self.ready = trio.Event()
        self.closed = trio.Event()
        self.error: BaseException | None = None
        self.connection: WebSocketConnection | None = None
        self._scope = trio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    async def _open(self, nursery: trio.Nursery) -> tws.WebSocketConnection:
        # TCP and TLS are set up here rather than by trio-websocket, which would wait forever
        # for its opening handshake when TLS fails (a certificate the client does not trust).
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        stream = await trio.open_tcp_stream(self._host, self._port)
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_hostname=self._host, https_compatible=True)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as e:
                    cause = e.__cause__ or e
                    raise trio.BrokenResourceError(f"TLS handshake with {self._host}:{self._port} failed: {cause}") from e
            default_port = 443 if self._ssl is not None else 80
            host = self._host if self._port == default_port else f"{self._host}:{self._port}"
            return await tws.wrap_client_stream(
                nursery, stream, host, self._path, max_message_size=_ws_limit(self._limit)
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def run(self) -> None:
        # Nothing may escape a system task: failures go to the connecting caller instead.
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    ws = await self._open(nursery)
                    self.connection = WebSocketConnection(ws, self._limit, self.closed)
                    self.ready.set()
                    await self.closed.wait()
                    nursery.cancel_scope.cancel()
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            self.error = _connect_error(e, f"{self._host}:{self._port}")
        finally:
            if self.connection is None and self.error is None:
                self.error = trio.BrokenResourceError(f"could not connect to {self._host}:{self._port}")
            self.ready.set()


def _connect_error(e: BaseException, where: str) -> BaseException:
    """One plain exception for a failed connect, whatever trio-websocket wrapped it in."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    if isinstance(e, (OSError, trio.BrokenResourceError, ssl.SSLError)):
        return e
    if isinstance(e, tws.ConnectionRejected):
        return trio.BrokenResourceError(f"{where} refused the WebSocket handshake (HTTP {e.status_code})")
    if isinstance(e, tws.HandshakeError):
        return trio.BrokenResourceError(f"WebSocket handshake with {where} failed: {e!r}")
    if isinstance(e, tws.ConnectionClosed):
        return trio.BrokenResourceError(f"{where} closed the connection during the handshake")
    return trio.BrokenResourceError(f"could not connect to {where}: {e!r}")


transport = WebSocketTransport()

