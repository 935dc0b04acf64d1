"""The contract every cloud transport meets.

A transport moves opaque msgpack-encoded frames between a client and the server; the protocol
itself (pydisco.cloud.protocol) is sans-IO and shared by all transports. Frames belong to numbered
streams: stream 0 carries connection-level frames (hello, auth, heartbeat, connection errors),
and each generate request gets its own stream id, chosen by the client (odd numbers, like QUIC
client-initiated bidirectional streams). A transport that has native streams (QUIC) maps each
id onto one of its streams; one that has not (WebSocket) carries the id in an envelope.

Errors: a peer that closes cleanly ends ``receive_frame`` with ``trio.EndOfChannel``, and
``send_frame`` to it raises ``trio.BrokenResourceError`` (a closed peer is gone: nothing sent
reaches it); a lost link or a reset raises ``trio.BrokenResourceError`` on both; using a closed
connection raises ``trio.ClosedResourceError``. A frame larger than ``max_frame_size`` is
refused by the receiving side with ``FrameTooLarge`` before it is buffered whole.
"""

from __future__ import annotations

import dataclasses
import ssl
import struct
import weakref
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

import trio

DEFAULT_MAX_FRAME_SIZE = 1 << 20


class FrameTooLarge(Exception):
    """A peer sent a frame over the size limit."""


# For transports without native streams (WebSocket, Zenoh): each message is a 4-byte
# big-endian stream id, then the frame.
ENVELOPE = struct.Struct(">I")


def seal_envelope(stream_id: int, frame: bytes) -> bytes:
    return ENVELOPE.pack(stream_id) + frame


def open_envelope(message: bytes, max_frame_size: int) -> tuple[int, bytes]:
    """(stream id, frame) of one enveloped message. A message too short to be an envelope
    goes to stream 0 whole (the protocol layer refuses it as a bad frame); a frame over
    ``max_frame_size`` raises FrameTooLarge."""
    if len(message) < ENVELOPE.size:
        return 0, message
    if len(message) - ENVELOPE.size > max_frame_size:
        raise FrameTooLarge(f"a frame of {len(message) - ENVELOPE.size} bytes exceeds the limit of {max_frame_size}")
    (stream_id,) = ENVELOPE.unpack_from(message)
    return stream_id, message[ENVELOPE.size :]


class FrameConnection(Protocol):
    """One client-server connection carrying frames on numbered streams."""

    async def send_frame(self, stream_id: int, frame: bytes) -> None:
        """Send one frame. Cancellation may leave the frame unsent but never half-sent."""
        ...

    async def receive_frame(self) -> tuple[int, bytes]:
        """Wait for the next frame from the peer, on any stream."""
        ...

    async def end_stream(self, stream_id: int) -> None:
        """Say that no more frames will be sent on ``stream_id`` (no-op where streams are virtual)."""
        ...

    async def aclose(self) -> None:
        """Close the connection; idempotent."""
        ...


class BatchingConnection(Protocol):
    """A connection that can send several frames in one write (optional for a transport)."""

    async def send_frames(self, frames: Sequence[tuple[int, bytes]], end: Collection[int] = ()) -> None:
        """Send ``frames`` in order, then end the streams in ``end``, in as few writes (system
        calls, datagrams) as the transport can. Same errors and cancellation as ``send_frame``:
        cancellation may leave frames unsent, never half-sent."""
        ...


async def send_frames(connection: FrameConnection, frames: Sequence[tuple[int, bytes]], end: Collection[int] = ()) -> None:
    """Send ``frames`` in order on ``connection``, then end the streams in ``end``: in one write
    where the transport can batch (``BatchingConnection``), else frame by frame."""
    batched = getattr(connection, "send_frames", None)  # cheaper than a runtime Protocol check
    if batched is not None:
        await batched(frames, end)
        return
    for stream_id, frame in frames:
        await connection.send_frame(stream_id, frame)
    for stream_id in end:
        await connection.end_stream(stream_id)


ConnectionHandler = Callable[[FrameConnection], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class ListenerInfo:
    """Where a started server listens (the port is the real one when 0 was asked for).

    ``stop_accepting``, when the transport can, closes the listening socket(s) while the
    connections already accepted go on (a draining server; with ``reuse_port`` the kernel then
    hands new connections to the other processes on the port). None: the transport cannot
    stop accepting apart from stopping (QUIC: one UDP socket carries every connection), so
    the server refuses new connections itself.
    """

    scheme: str
    host: str
    port: int
    stop_accepting: Callable[[], None] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


_REMOTE_HOSTS: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def set_remote_host(connection: object, host: str) -> None:
    """A server transport records the client address of a connection it accepted."""
    _REMOTE_HOSTS[connection] = host


def remote_host(connection: object) -> str | None:
    """The client address (IP, no port) a server transport recorded for ``connection``, or
    None (a transport without addresses, such as ``memory``)."""
    return _REMOTE_HOSTS.get(connection)


class Transport(Protocol):
    """A transport implementation, registered under one or more URL schemes."""

    schemes: tuple[str, ...]

    async def connect(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> FrameConnection:
        """Open a client connection to ``url``."""
        ...

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
        """Accept connections until cancelled, running ``handler`` for each in its own task.
        A transport that can share its port with other processes (SO_REUSEPORT) also takes
        ``reuse_port: bool = False`` (the server passes it only when asked to)."""
        ...
