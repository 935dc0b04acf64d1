"""An in-process transport for tests: ``memory://name:port``, no sockets, same contract.

Listeners live in a per-``trio.run`` table, so tests cannot see each other's servers. Frames are
not copied or encoded; the receiving side enforces its ``max_frame_size`` with ``FrameTooLarge``
like the network transports. :meth:`MemoryConnection.abort` drops the link the way a crashed
peer would (the other side gets ``BrokenResourceError``), which tests use to emulate a lost link.
"""

from __future__ import annotations

import dataclasses
import itertools
import ssl
from urllib.parse import urlsplit

import trio

from ._base import DEFAULT_MAX_FRAME_SIZE, ConnectionHandler, FrameConnection, FrameTooLarge, ListenerInfo

_BUFFER = 64  # frames in flight per direction before send_frame waits (backpressure)


class _Pipe:
    """One direction of a connection."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[tuple[int, bytes]](_BUFFER)
        self.broken = False


class MemoryConnection:
    """One end of an in-memory connection (meets ``transports._base.FrameConnection``)."""

    def __init__(self, outgoing: _Pipe, incoming: _Pipe, max_frame_size: int) -> None:
        self._out = outgoing
        self._in = incoming
        self._max_frame_size = max_frame_size
        self._closed = False

    async def send_frame(self, stream_id: int, frame: bytes) -> None:
        """Queue one frame; waits while the peer's buffer is full. Cancellation leaves it unsent."""
        if self._closed:
            raise trio.ClosedResourceError("this connection is closed")
        if self._out.broken:
            raise trio.BrokenResourceError("the link is down")
        try:
            await self._out.send.send((stream_id, bytes(frame)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._closed:  # our own aclose/abort ran meanwhile
                raise trio.ClosedResourceError("this connection is closed") from None
            raise trio.BrokenResourceError("the peer closed the connection or the link is down") from None

    async def receive_frame(self) -> tuple[int, bytes]:
        """Next frame from the peer. EndOfChannel after a clean close, BrokenResourceError after
        an abort, FrameTooLarge for a frame over the limit (the connection stays usable)."""
        if self._closed:
            raise trio.ClosedResourceError("this connection is closed")
        try:
            stream_id, frame = await self._in.receive.receive()
        except trio.EndOfChannel:
            if self._in.broken:
                raise trio.BrokenResourceError("the link went down") from None
            raise
        except trio.ClosedResourceError:
            if self._closed:
                raise trio.ClosedResourceError("this connection is closed") from None
            raise trio.BrokenResourceError("the link went down") from None  # the peer aborted
        if len(frame) > self._max_frame_size:
            raise FrameTooLarge(f"a frame of {len(frame)} bytes exceeds the limit of {self._max_frame_size}")
        return stream_id, frame

    async def end_stream(self, stream_id: int) -> None:
        """Streams are virtual here: nothing to do."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close cleanly: the peer reads what was sent, then gets EndOfChannel. Idempotent."""
        self._shut(broken=False)
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Drop the link as a crash would: both sides' pending frames are lost."""
        self._shut(broken=True)

    def _shut(self, *, broken: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.broken = self._out.broken or broken
        self._in.broken = self._in.broken or broken
        self._out.send.close()
        self._in.receive.close()
        if broken:
            # Make the peer's pending receive see the break now, not after draining old frames.
            self._out.receive.close()
            self._in.send.close()


def connection_pair(max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> tuple[MemoryConnection, MemoryConnection]:
    """Two connected ends, (client, server), without a listener."""
    a_to_b, b_to_a = _Pipe(), _Pipe()
    return MemoryConnection(a_to_b, b_to_a, max_frame_size), MemoryConnection(b_to_a, a_to_b, max_frame_size)


@dataclasses.dataclass
class _Listener:
    handler: ConnectionHandler
    nursery: trio.Nursery
    max_frame_size: int


_LISTENERS: trio.lowlevel.RunVar[dict[tuple[str, int], _Listener]] = trio.lowlevel.RunVar("memory_listeners")
_PORTS = itertools.count(1)


def _table() -> dict[tuple[str, int], _Listener]:
    try:
        return _LISTENERS.get()
    except LookupError:
        table: dict[tuple[str, int], _Listener] = {}
        _LISTENERS.set(table)
        return table


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "memory" or not parts.hostname:
        raise ValueError(f"not a memory:// URL with a name: {url!r}")
    return parts.hostname, parts.port or 0


class MemoryTransport:
    """The ``memory`` scheme. TLS contexts are accepted and ignored: nothing leaves the process."""

    schemes = ("memory",)

    async def connect(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> FrameConnection:
        """Connect to a listener of this Trio run; OSError (as for TCP) if there is none."""
        await trio.lowlevel.checkpoint()
        listener = _table().get(_address(url))
        if listener is None:
            raise ConnectionRefusedError(f"nothing listens on {url}")
        a_to_b, b_to_a = _Pipe(), _Pipe()
        client = MemoryConnection(a_to_b, b_to_a, max_frame_size)
        server = MemoryConnection(b_to_a, a_to_b, listener.max_frame_size)
        listener.nursery.start_soon(_run_handler, listener.handler, server)
        return client

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
        """Listen on ``memory://host:port`` (port 0 picks a fresh one) until cancelled."""
        table = _table()
        if port == 0:
            port = next(p for p in _PORTS if (host, p) not in table)
        if (host, port) in table:
            raise OSError(f"memory://{host}:{port} is already in use")
        try:
            async with trio.open_nursery() as nursery:
                table[(host, port)] = _Listener(handler, nursery, max_frame_size)
                task_status.started(ListenerInfo("memory", host, port))
                await trio.sleep_forever()
        finally:
            table.pop((host, port), None)


async def _run_handler(handler: ConnectionHandler, connection: MemoryConnection) -> None:
    # The server's end goes away with its handler, as a socket would: closed cleanly when the
    # handler returns, dropped when it fails or the server is cancelled.
    try:
        await handler(connection)
    except BaseException:
        connection.abort()
        raise
    await connection.aclose()


transport = MemoryTransport()
